"""Compression recipes: which methods run, with which settings, on which layers.

A recipe comes from CLI flags or a TOML file::

    [calibration]                # optional; default: built-in text, 16 x 512 tokens
    path = "calib.txt"           # or inputs.npz
    samples = 16
    seq_len = 512

    [prune]                      # unstructured / N:M
    method = "wanda"             # magnitude | wanda | sparsegpt
    sparsity = 0.5               # or  n_m = "2:4"

    [structured]
    ffn_ratio = 0.25             # fraction of FFN neurons / hidden channels removed

    [lowrank]
    method = "whiten"            # svd | asvd | whiten
    ratio = 0.2                  # fraction of each layer's parameters removed (or energy = 0.95)

    [quantize]
    method = "gptq"              # rtn | gptq | awq
    bits = 4
    group_size = 128             # 0 = per output channel
    symmetric = false
    zero_point = "float"         # optional: each asymmetric group's grid starts at its minimum (as llama.cpp's
                                 # Q4_1; default "integer": a code, 0 exactly representable); symmetric has none
    activations = "int8"         # optional: also round each quantized matmul's input to 8-bit codes,
                                 # one run-time scale per activation_block (32) values (default "float")
    awq_clip = true              # AWQ: also search each group's clipping range (never for queries and
                                 # keys, never raising the error of the peak-activation rows)

    [[rules]]                    # later rules win; a layer is named like model.layers.0.mlp.up_proj
    match = "lm_head"
    quantize = { bits = 8, group_size = 0 }
    [[rules]]
    match = "*.mlp.down_proj"
    prune = false                # leave this step out for matching layers

Steps always run in the order prune -> structured -> lowrank -> quantize. Every setting is checked
when the recipe is built (:class:`CompressionOptionError`); a rule that matches no layer of the
model is an error (:class:`RecipeLayerError`), not a silent no-op.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from slimgraph.compiler.calibration import CalibrationSpec
from slimgraph.compiler.errors import CompressionOptionError, RecipeLayerError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CompressionOptionError(message)


ACTIVATION_FORMATS = ("float", "int8")
ZERO_POINTS = ("integer", "float")


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = True
    awq_clip: bool = True           # AWQ's per-group range (clip) search after the scale search
    zero_point: str = "integer"     # "float": asymmetric groups keep their own minimum (no effect when symmetric)
    activations: str = "float"      # "int8": matmul inputs rounded per block at run time (dynamic_quantize)
    activation_block: int = 32      # values of a matmul input sharing one run-time scale

    def __post_init__(self):
        _check(self.method in ("rtn", "gptq", "awq"), f"unknown quantization method {self.method!r} (rtn, gptq, awq)")
        _check(self.bits in (2, 3, 4, 5, 6, 8), f"--bits must be one of 2, 3, 4, 5, 6, 8, got {self.bits}")
        _check(self.group_size is None or self.group_size >= 8,
               f"--group-size must be at least 8 (or 0 for per channel), got {self.group_size}")
        _check(0 < self.damp < 1, f"GPTQ damping must be in (0, 1), got {self.damp}")
        _check(self.zero_point in ZERO_POINTS, f"zero_point must be one of {', '.join(ZERO_POINTS)}, "
                                               f"got {self.zero_point!r}")
        _check(self.activations in ACTIVATION_FORMATS,
               f"--quantize-activations must be one of {', '.join(ACTIVATION_FORMATS)}, got {self.activations!r}")
        _check(self.activation_block >= 4, f"activation_block must be at least 4, got {self.activation_block}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")


@dataclass(frozen=True)
class PruneSettings:
    method: str = "magnitude"
    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None

    def __post_init__(self):
        _check(self.method in ("magnitude", "wanda", "sparsegpt"),
               f"unknown pruning method {self.method!r} (magnitude, wanda, sparsegpt)")
        _check(0.0 < self.sparsity < 1.0, f"--prune sparsity must be in (0, 1), got {self.sparsity}")
        if self.n_m is not None:
            n, m = self.n_m
            _check(0 < n < m, f"N:M sparsity needs 0 < N < M, got {n}:{m}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"


@dataclass(frozen=True)
class StructuredSettings:
    ffn_ratio: float = 0.25
    multiple: int = 16

    def __post_init__(self):
        _check(0.0 < self.ffn_ratio < 1.0, f"--prune-ffn ratio must be in (0, 1), got {self.ffn_ratio}")

    needs_calibration = True


@dataclass(frozen=True)
class LowRankSettings:
    method: str = "svd"
    ratio: float | None = None         # default 0.2 when no energy is given either
    energy: float | None = None
    EXCLUSIVE = ("ratio", "energy")    # naming one in an override replaces the other

    def __post_init__(self):
        if self.ratio is None and self.energy is None:
            object.__setattr__(self, "ratio", 0.2)
        _check(self.method in ("svd", "asvd", "whiten"), f"unknown low-rank method {self.method!r} (svd, asvd, whiten)")
        _check((self.ratio is None) != (self.energy is None), "low-rank needs exactly one of ratio or energy")
        _check(self.ratio is None or 0.0 < self.ratio < 1.0, f"--lowrank ratio must be in (0, 1), got {self.ratio}")
        _check(self.energy is None or 0.0 < self.energy <= 1.0, f"low-rank energy must be in (0, 1], got {self.energy}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd"


STEPS = {"prune": PruneSettings, "structured": StructuredSettings, "lowrank": LowRankSettings,
         "quantize": QuantizeSettings}
"""Compression steps in the order they run."""


@dataclass(frozen=True)
class LayerRule:
    """``overrides[step]`` is False (skip the step) or a dict of settings replacing the global ones."""

    match: str
    overrides: dict = field(default_factory=dict)

    def matches(self, layer: str) -> bool:
        return fnmatch.fnmatchcase(layer, self.match)


@dataclass(frozen=True)
class Recipe:
    steps: dict = field(default_factory=dict)          # step name -> settings (global)
    rules: tuple = ()
    calibration: CalibrationSpec = CalibrationSpec()

    @property
    def empty(self) -> bool:
        return not self.steps and not any(v for r in self.rules for v in r.overrides.values())

    def step_names(self) -> list[str]:
        used = set(self.steps) | {s for r in self.rules for s, v in r.overrides.items() if v is not False}
        return [s for s in STEPS if s in used]

    def settings_for(self, step: str, layer: str):
        """The settings of ``step`` for ``layer`` (None: the step leaves this layer alone)."""
        settings = self.steps.get(step)
        for rule in self.rules:
            if step in rule.overrides and rule.matches(layer):
                value = rule.overrides[step]
                if value is False:
                    settings = None
                else:
                    base = settings or STEPS[step]()
                    settings = _merge(STEPS[step], base, value, f"rule {rule.match!r}")
        return settings

    def check_rules(self, layers: list[str]) -> None:
        for rule in self.rules:
            if not any(rule.matches(name) for name in layers):
                raise RecipeLayerError(f"recipe rule {rule.match!r} matches no layer of the model; "
                                       f"layers look like {', '.join(layers[:3])}, ...")

    def to_dict(self) -> dict:
        return {"steps": {k: dataclasses.asdict(v) for k, v in self.steps.items()},
                "rules": [{"match": r.match, **r.overrides} for r in self.rules],
                "calibration": dataclasses.asdict(self.calibration)}


def _merge(cls, base, values: dict, where: str):
    """``base`` (settings of ``cls`` or None) with ``values`` overriding the settings they name; naming
    one of a class's mutually exclusive settings (``EXCLUSIVE``) drops the base's others."""
    known = dataclasses.asdict(base) if base is not None else {}
    exclusive = getattr(cls, "EXCLUSIVE", ())
    if any(key in values for key in exclusive):
        known = {k: v for k, v in known.items() if k not in exclusive}
    return _build(cls, {**known, **values}, where)


def _build(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    _check(not unknown, f"{where}: unknown setting(s) {sorted(unknown)} for [{_step_of(cls)}]")
    values = dict(values)
    if values.get("group_size") == 0:
        values["group_size"] = None
    if isinstance(values.get("n_m"), str):
        values["n_m"] = parse_n_m(values["n_m"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise CompressionOptionError(f"{where}: {exc}") from None


def _step_of(cls) -> str:
    return next(k for k, v in STEPS.items() if v is cls)


def parse_n_m(text: str) -> tuple[int, int]:
    try:
        n, m = (int(p) for p in text.split(":"))
    except ValueError:
        raise CompressionOptionError(f"N:M sparsity must look like 2:4, got {text!r}") from None
    return n, m


def read_toml(path: Path, what: str) -> dict:
    """The tables of a TOML file; unreadable or malformed files raise CompressionOptionError."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CompressionOptionError(f"{path}: cannot read {what} ({exc})") from None


def recipe_from_toml(path: str | Path) -> Recipe:
    """Parse a recipe file (see the module docstring)."""
    path = Path(path)
    data = read_toml(path, "recipe")
    unknown = set(data) - set(STEPS) - {"rules", "calibration"}
    _check(not unknown, f"{path}: unknown section(s) {sorted(unknown)}")
    steps = {s: _build(STEPS[s], data[s], f"{path} [{s}]") for s in STEPS if s in data}
    rules = tuple(_rule(r, path) for r in data.get("rules", []))
    calib = _build_calibration(data.get("calibration", {}), path)
    return Recipe(steps, rules, calib)


def _rule(data: dict, path: Path) -> LayerRule:
    _check("match" in data, f"{path}: every [[rules]] entry needs match = \"pattern\"")
    overrides = {}
    for step, value in data.items():
        if step == "match":
            continue
        _check(step in STEPS, f"{path}: rule {data['match']!r} has unknown step {step!r}")
        _check(value is False or isinstance(value, dict), f"{path}: rule {data['match']!r}: {step} must be false or a table")
        if isinstance(value, dict):
            _build(STEPS[step], value, f"{path} rule {data['match']!r}")  # validate now
        overrides[step] = value
    return LayerRule(data["match"], overrides)


def _build_calibration(data: dict, where) -> CalibrationSpec:
    unknown = set(data) - {"path", "samples", "seq_len"}
    _check(not unknown, f"{where}: unknown calibration setting(s) {sorted(unknown)}")
    spec = CalibrationSpec(**data)
    _check(spec.samples >= 1 and spec.seq_len >= 2, f"{where}: calibration needs samples >= 1 and seq_len >= 2")
    return spec


def recipe_from_flags(*, recipe_file: str | Path | None = None, quantize: str | None = None,
                      group_size: int = 128, method: str = "rtn", symmetric: bool = False,
                      prune: float | None = None, prune_method: str = "magnitude", prune_n_m: str | None = None,
                      prune_ffn: float | None = None, lowrank: float | None = None, lowrank_method: str = "svd",
                      lowrank_energy: float | None = None, calib: str | None = None, calib_samples: int | None = None,
                      calib_seq_len: int | None = None, activations: str | None = None) -> Recipe:
    """A recipe from ``slimgraph compile`` flags. A step's flags override the settings they name in
    the file's global section; its other settings (``awq_clip``, ``damp``, ...) stay the file's."""
    base = recipe_from_toml(recipe_file) if recipe_file else Recipe()
    steps = dict(base.steps)

    def merge(step: str, values: dict, where: str) -> None:
        steps[step] = _merge(STEPS[step], steps.get(step), values, where)

    if quantize is not None:
        merge("quantize", {"method": method, "bits": _bits(quantize), "group_size": group_size,
                           "symmetric": symmetric}, "--quantize")
    if activations is not None:
        _check("quantize" in steps, "--quantize-activations needs quantized weights (--quantize or a [quantize] "
                                    "step in the recipe)")
        merge("quantize", {"activations": activations}, "--quantize-activations")
    if prune is not None or prune_n_m is not None:
        values = {"method": prune_method, "sparsity": prune if prune is not None else 0.5, "n_m": prune_n_m}
        merge("prune", values, "--prune")
    if prune_ffn is not None:
        merge("structured", {"ffn_ratio": prune_ffn}, "--prune-ffn")
    if lowrank is not None or lowrank_energy is not None:
        merge("lowrank", {"method": lowrank_method, "ratio": lowrank, "energy": lowrank_energy}, "--lowrank")
    calibration = dataclasses.replace(
        base.calibration, **{k: v for k, v in (("path", calib), ("samples", calib_samples),
                                               ("seq_len", calib_seq_len)) if v is not None})
    return Recipe(steps, base.rules, _build_calibration(dataclasses.asdict(calibration), "--calib"))


def _bits(text: str) -> int:
    """``int4`` / ``4`` -> 4."""
    value = text.lower().removeprefix("int")
    _check(value.isdigit(), f"--quantize wants int8, int4, int3 (or a bit count), got {text!r}")
    return int(value)
