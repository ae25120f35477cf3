"""The pass manager: a registry of named module-to-module passes and the pipeline that runs them.

A pass is a function ``module -> PassResult`` (or a class whose instances are such callables)
registered with ``@register_pass("name")``. Passes never mutate their input: the IR is immutable
and weights are shared, so a pass returns a new :class:`Module` plus whether anything changed and
counters (``stats``) describing what it did.

:func:`run_pipeline` runs passes in order and records, per pass, node and kernel counts and time.
It can dump the IR after every pass (``00-input.ir``, ``01-fold_constants.ir``, ...), send the text
after chosen passes to a callback, and -- with ``verify=True`` -- check after every pass that the
module is still well formed *and* still computes the same outputs as the input module (run by the
reference interpreter), naming the first pass that broke it. The library never prints: progress
goes to ``on_event(kind, payload)`` with kinds ``pass_start``, ``pass_end`` and ``print_after``.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import numpy as np

from slimgraph.compiler.errors import SlimgraphError, UnknownPassError, VerificationError
from slimgraph.compiler.ir import Module
from slimgraph.compiler.printer import print_module

DEFAULT_PIPELINE = ("fold_constants", "simplify", "cse", "dce", "simplify", "merge_parallel_products", "fuse",
                    "dce")
"""simplify runs twice: after CSE merged duplicate subexpressions (``x - mean(x)`` written twice)
the normalization patterns become visible."""

BUILTIN_PASS_MODULES = ("constant_folding", "dead_code", "cse", "simplify", "parallel_products", "fusion",
                        "half_precision")


class PassResult(NamedTuple):
    module: Module
    changed: bool
    stats: dict


@dataclass(frozen=True)
class PassInfo:
    """A pass; ``lossy`` passes (compression) change outputs on purpose: ``--verify`` checks their
    result's structure and then takes its outputs as the new reference for the passes after it."""

    name: str
    run: Callable[[Module], PassResult]
    doc: str
    lossy: bool = False


_REGISTRY: dict[str, PassInfo] = {}
_BUILTINS_LOADED = False


def register_pass(name: str, *, lossy: bool = False):
    """Decorator: register a pass function (or a class, instantiated without arguments)."""

    def decorate(obj):
        fn = obj() if isinstance(obj, type) else obj
        doc = (obj.__doc__ or "").strip()
        if not doc:
            raise TypeError(f"pass {name!r} needs a docstring explaining what it does")
        _REGISTRY[name] = PassInfo(name, fn, doc, lossy)
        return obj

    return decorate


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for mod in BUILTIN_PASS_MODULES:
            importlib.import_module(f"slimgraph.passes.{mod}")


def get_pass(name: str) -> PassInfo:
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownPassError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_passes() -> list[PassInfo]:
    _load_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


# ----------------------------------------------------------------------------- numerical checks
COSINE_MIN = 0.99999
RELATIVE_MAX_ERR = 1e-4


class Comparison(NamedTuple):
    ok: bool
    cosine: float
    max_abs_err: float
    tolerance: float
    message: str


def compare_outputs(ref: np.ndarray, got: np.ndarray) -> Comparison:
    """Float outputs match when cosine(ref, got) >= 0.99999 and max|ref - got| <= 1e-4 * max|ref|
    (non-finite entries must sit at the same places with the same value); integer and bool
    outputs must be equal."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return Comparison(False, 0.0, float("inf"), 0.0,
                          f"shape/dtype {got.shape} {got.dtype} != reference {ref.shape} {ref.dtype}")
    if ref.dtype.kind not in "fc":
        bad = int(np.count_nonzero(ref != got))
        return Comparison(bad == 0, 1.0 if bad == 0 else 0.0, float(bad), 0.0,
                          "equal" if bad == 0 else f"{bad} element(s) differ")
    r, g = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r)
    if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(r[~finite], g[~finite], equal_nan=True):
        return Comparison(False, 0.0, float("inf"), 0.0, "non-finite values differ")
    r, g = r[finite], g[finite]
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    err = float(np.max(np.abs(r - g))) if r.size else 0.0
    tol = RELATIVE_MAX_ERR * scale
    norms = float(np.linalg.norm(r) * np.linalg.norm(g))
    cosine = float(np.dot(r, g) / norms) if norms > 0 else (1.0 if err == 0 else 0.0)
    ok = cosine >= COSINE_MIN and err <= tol
    return Comparison(ok, cosine, err, tol, f"cosine {cosine:.7f}, max abs err {err:.3g} (tolerance {tol:.3g})")


def make_sample_inputs(module: Module, *, seed: int = 0, symbol_value: int = 7) -> dict[str, np.ndarray]:
    """Deterministic inputs for the entry function: floats ~ N(0, 1); integer inputs used as
    ``take`` indices get ids in [0, table size); other integers (masks) are 1; bools are True.
    Every symbolic dim is bound to ``symbol_value``."""
    fn = module.main
    rng = np.random.default_rng(seed)
    env = {s: symbol_value for p in fn.params for s in p.type.symbols()}
    bounds = _index_bounds(module, fn)
    out = {}
    for p in fn.params:
        shape, dtype = p.type.concrete(env), p.type.dtype.numpy
        if dtype.kind == "f":
            out[p.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[p.name] = np.ones(shape, dtype)
        elif p.name in bounds:
            out[p.name] = rng.integers(0, bounds[p.name], size=shape).astype(dtype)
        else:
            out[p.name] = np.ones(shape, dtype)
    return out


def _index_bounds(module: Module, fn) -> dict[str, int]:
    from slimgraph.compiler.ops import TAKE

    types = fn.value_types(module)
    bounds: dict[str, int] = {}
    for node in fn.nodes:
        if node.op is TAKE and node.inputs[1] in {p.name for p in fn.params}:
            data = types[node.inputs[0]]
            size = data.shape[node.attrs["axis"] % data.rank]
            if isinstance(size, int):
                bounds[node.inputs[1]] = min(size, bounds.get(node.inputs[1], size))
    return bounds


# ----------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: bool
    stats: dict
    nodes_before: int
    nodes_after: int
    kernels_before: int
    kernels_after: int
    seconds: float


@dataclass
class PipelineReport:
    module: Module
    records: list = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


class _Verifier:
    """Checks structure and outputs after each pass against the outputs of the input module."""

    def __init__(self, module: Module, inputs: Mapping[str, np.ndarray] | None):
        from slimgraph.compiler import interpreter, verifier

        self.interpreter, self.verifier = interpreter, verifier
        self.inputs = dict(inputs) if inputs is not None else make_sample_inputs(module)
        verifier.verify(module, source="pipeline input")
        self.reference = interpreter.run(module, self.inputs)
        self.output_names = module.main.outputs

    def check(self, module: Module, pass_name: str, where: str = "", *, lossy: bool = False) -> None:
        try:
            self.verifier.verify(module, source=f"after pass {pass_name!r}")
            outputs = self.interpreter.run(module, self.inputs)
        except SlimgraphError as exc:
            raise VerificationError(f"pass {pass_name!r}{where} produced an invalid module: {exc.message}") from None
        if lossy:
            self.reference = outputs
            return
        for i, (ref, got) in enumerate(zip(self.reference, outputs)):
            cmp = compare_outputs(ref, got)
            if not cmp.ok:
                raise VerificationError(
                    f"pass {pass_name!r}{where} changed output #{i} (%{self.output_names[i]}): {cmp.message}",
                    hint=f"re-run without {pass_name!r} (--passes) and report the input IR (--dump-ir)")


def run_pipeline(module: Module, passes: Iterable[str | PassInfo] = DEFAULT_PIPELINE, *, verify: bool = False,
                 sample_inputs: Mapping[str, np.ndarray] | None = None, print_after: Iterable[str] = (),
                 dump_dir: Path | str | None = None,
                 on_event: Callable[[str, dict], None] | None = None) -> PipelineReport:
    """Run ``passes`` in order: registered names, or configured passes given as :class:`PassInfo`
    (the compression steps); see the module docstring for dumps, events and checks."""
    infos = [p if isinstance(p, PassInfo) else get_pass(p) for p in passes]
    print_after = set(print_after)
    unknown = print_after - {i.name for i in infos}
    if unknown:
        raise UnknownPassError(f"--print-after names pass(es) not in the pipeline: {', '.join(sorted(unknown))}")
    emit = on_event or (lambda kind, payload: None)
    dump = Path(dump_dir) if dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00-input.ir").write_text(print_module(module))
    checker = _Verifier(module, sample_inputs) if verify else None
    report = PipelineReport(module)
    for index, info in enumerate(infos, start=1):
        emit("pass_start", {"pass": info.name, "index": index, "total": len(infos)})
        before = report.module
        start = time.perf_counter()
        result = info.run(before)
        seconds = time.perf_counter() - start
        after = result.module
        record = PassRecord(info.name, bool(result.changed), dict(result.stats), before.num_nodes(),
                            after.num_nodes(), before.num_kernels(), after.num_kernels(), seconds)
        report.records.append(record)
        report.module = after
        if checker is not None:
            checker.check(after, info.name, f" (pass {index} of {len(infos)})", lossy=info.lossy)
        text = print_module(after) if (dump is not None or info.name in print_after) else None
        if dump is not None:
            (dump / f"{index:02d}-{info.name}.ir").write_text(text)
        emit("pass_end", {"pass": info.name, "index": index, "total": len(infos), "record": record})
        if info.name in print_after:
            emit("print_after", {"pass": info.name, "index": index, "text": text})
    return report
