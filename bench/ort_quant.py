"""ONNX Runtime's own 4-bit weight quantizer (MatMulNBits: RTN, GPTQ) on SmolLM2, scored by perplexity.

    python bench/ort_quant.py [--methods default,rtn,gptq] [--schemes asym,sym] [--max-tokens N]
                              [--window 512] [--calib-sequences 32] [--calib-len 512] [--lm-head] [--force]

The ONNX Runtime half of the int4 acceptance comparison: the fp32 ONNX export of SmolLM2 (logits only,
dynamic T) is quantized with ``onnxruntime.quantization.matmul_nbits_quantizer`` and every model is scored
by :func:`slimgraph.compiler.evaluation.perplexity` on exactly the tokens ``slimgraph eval`` scores.

What ORT's quantizer does (onnxruntime 1.32, read from its source and checked on SmolLM2):
* ``rtn``/``gptq`` run ORT's vendored copy of Intel Neural Compressor's weight-only code (no extra package);
  ``default`` is ORT's C++ RTN. Asymmetric (uint4 + zero point per group) unless ``is_symmetric=True``.
  Only 4 bits (rtn also 8; default 2/4/8) become MatMulNBits: no 3-bit.
* Only MatMuls with an initializer weight are quantized: the 210 projections. The tied lm_head multiplies
  by a run-time ``Transpose(embedding)`` and the embedding is a Gather: both stay fp32 (``--lm-head``
  stores that transpose as an initializer first, so the lm_head is quantized too).
* rtn/gptq asym crash on K=576 (5 groups of 128) in ORT's zero-point packing: see _column_zero_points.
* ORT's GPTQ propagates no rounding error (its loop reads the upper Cholesky factor of H^-1 by column,
  which is zero below the diagonal), so it equals RTN on a min/max grid that includes 0. Its symmetric
  variant re-quantizes the GPTQ grid (scale 2*max/15, codes -8..7) with scale 2*max'/15 where max' is
  8 steps: most weights move. Both are reported as ORT produces them.
* GPTQ's group size is the quantizer's ``block_size`` (its lazy-update block is set equal).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import logging
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK_DIR, write_results  # noqa: E402

MODEL = "smollm2"


def _quantizer_module():
    """ORT's MatMulNBits quantizer module, with its per-node INFO logging turned down."""
    from onnxruntime.quantization import matmul_nbits_quantizer

    for name in (matmul_nbits_quantizer.__name__, "neural_compressor", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def gptq_unavailable_reason() -> str | None:
    """None when ORT's GPTQ can run here, else the import error text (nothing needs installing in 1.32)."""
    try:
        from onnxruntime.quantization.neural_compressor.weight_only import gptq_quantize  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the reason is reported in the results row
        return f"{type(exc).__name__}: {exc}"
    return None


class _TokenReader:
    """ORT CalibrationDataReader over fixed token sequences: one {"input_ids": [1, L]} feed per sequence."""

    def __init__(self, sequences):
        self.feeds = [{"input_ids": np.asarray(s, np.int64).reshape(1, -1)} for s in sequences]

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None

    def __iter__(self):
        return iter(self.get_next, None)


def _gptq_config(q, *, block_size, symmetric, bits, calibration_ids):
    if not calibration_ids:
        raise ValueError("GPTQ needs calibration_ids (token sequences)")
    return q.GPTQWeightOnlyQuantConfig(calibration_data_reader=_TokenReader(calibration_ids), block_size=block_size)


ALGORITHMS = {  # method -> ORT config; scheme, bits and group of rtn/gptq come from MatMulNBitsQuantizer itself
    "rtn": lambda q, **_: q.RTNWeightOnlyQuantConfig(),
    "gptq": _gptq_config,
    "default": lambda q, *, block_size, symmetric, bits, **_: q.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, bits=bits),
}


def untie_lm_head(model) -> int:
    """Store each Transpose(initializer) feeding a MatMul weight as an initializer, so it can be quantized.

    The tied lm_head computes h @ E^T (E: embedding table); afterwards it reads a stored [hidden, vocab] E^T.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input[1:2]}
    rewired = [n for n in model.graph.node
               if n.op_type == "Transpose" and n.input[0] in inits and n.output[0] in consumers]
    for node in rewired:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        transposed = np.ascontiguousarray(np.transpose(numpy_helper.to_array(inits[node.input[0]]), perm))
        model.graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
        model.graph.node.remove(node)
    return len(rewired)


def _column_zero_points(make_node):
    """Wrap ORT's ``make_matmul_weight_only_node`` so 4-bit zero points are packed per output column.

    MatMulNBits wants uint8 zero points of shape [N, ceil(k_blocks / 2)], each column padded on its own.
    ORT 1.32's RTN/GPTQ path packs all N*k_blocks values as one stream, then reshapes to [N, -1]: with
    odd k_blocks (SmolLM2's K=576 is 5 groups of 128) that fails ("cannot reshape array of size 1440
    into shape (576,newaxis)"). For even k_blocks both layouts are the same bytes.
    """
    from onnx import numpy_helper

    def make(**kw):  # ORT calls it with keyword arguments only
        if kw["zero_point"] is None or kw["num_bits"] != 4:
            return make_node(**kw)
        q_node, inits = make_node(**{**kw, "zero_point": None})
        zp = np.asarray(kw["zero_point"], np.uint8).reshape(kw["weight_shape"][1], kw["k_blocks"])
        zp = np.pad(zp, ((0, 0), (0, kw["k_blocks"] % 2)), constant_values=8)   # 8: the unused nibble
        inits.append(numpy_helper.from_array(zp[:, 0::2] | (zp[:, 1::2] << 4), kw["node"].input[1] + "_zp"))
        q_node.input.append(inits[-1].name)
        return q_node, inits

    return make


class _OnePassSession:
    """Stand-in for the session ORT's GPTQ opens, with the same values and far fewer model runs.

    ORT asks for one MatMul input at a time for every calibration feed, and each request runs the whole
    model: 120 inputs x 32 feeds = 3840 runs of SmolLM2 (hours on 2 cores). This runs the same session
    once per feed, fetching all weight-MatMul inputs together, and answers from .npy files in ``folder``.
    """

    def __init__(self, session, names, folder: Path):
        self.session, self.names, self.folder = session, sorted(names), folder

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, output_names, feed):
        if len(output_names) != 1 or output_names[0] not in self.names:
            return self.session.run(output_names, feed)
        key = hashlib.sha1(b"".join(np.ascontiguousarray(v).tobytes() for v in feed.values())).hexdigest()
        files = {name: self.folder / f"{key[:16]}-{i}.npy" for i, name in enumerate(self.names)}
        if not files[output_names[0]].is_file():
            for name, value in zip(self.names, self.session.run(self.names, feed)):
                np.save(files[name], value)
        return [np.load(files[output_names[0]])]


@contextlib.contextmanager
def _quantizer_patches(fix_zero_points: bool, gptq_inputs: set[str]):
    """While quantizing: :func:`_column_zero_points` if asked, GPTQ's session replaced by a
    :class:`_OnePassSession` over ``gptq_inputs``, and ORT's progress-bar prints muted."""
    import onnxruntime as ort
    from onnxruntime.quantization.neural_compressor import weight_only

    original = weight_only.make_matmul_weight_only_node, weight_only.ort
    if fix_zero_points:
        weight_only.make_matmul_weight_only_node = _column_zero_points(original[0])
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=WORK_DIR) as tmp, contextlib.redirect_stdout(io.StringIO()):
            opener = lambda *a, **kw: _OnePassSession(ort.InferenceSession(*a, **kw), gptq_inputs, Path(tmp))
            weight_only.ort = types.SimpleNamespace(SessionOptions=ort.SessionOptions, InferenceSession=opener)
            yield
    finally:
        weight_only.make_matmul_weight_only_node, weight_only.ort = original


def quantize_matmul_nbits(fp32_onnx, out_path, *, method: str, bits: int = 4, block_size: int = 128,
                          symmetric: bool, calibration_ids=None, lm_head: bool = False,
                          fix_zero_points: bool = True) -> Path:
    """Quantize every MatMul weight of ``fp32_onnx`` to ``bits``-bit groups of ``block_size`` input rows.

    method: "rtn" | "gptq" (ORT's Neural-Compressor path) | "default" (ORT's C++ RTN).
    calibration_ids: token sequences (int64 arrays) fed to the model for GPTQ's Hessians H = 2/n sum X^T X.
    fix_zero_points: pack asymmetric zero points per column (see :func:`_column_zero_points`); with
    False, ORT 1.32's rtn/gptq asymmetric path fails on SmolLM2 at group 128.
    """
    import onnx

    q = _quantizer_module()
    if method not in ALGORITHMS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(ALGORITHMS)}")
    model = onnx.load(str(fp32_onnx))
    if lm_head:
        untie_lm_head(model)
    config = ALGORITHMS[method](q, block_size=block_size, symmetric=symmetric, bits=bits,
                                calibration_ids=calibration_ids)
    if method != "default" and bits != 4:
        matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
        config.customized_weight_config = {name: {"bits": bits} for name in matmuls}
    quantizer = q.MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric, algo_config=config)
    weights = {i.name for i in model.graph.initializer}
    gptq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    with _quantizer_patches(fix_zero_points, gptq_inputs):
        quantizer.process()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path


def model_bytes(path) -> int:
    """Bytes on disk of an ONNX model: the .onnx file plus its external-data file, if any."""
    return sum(p.stat().st_size for p in (Path(path), Path(f"{path}.data")) if p.is_file())


def weight_summary(path) -> dict:
    """How many MatMuls were packed into MatMulNBits, and how many fp32 weight bytes remain (embedding...)."""
    import onnx

    model = onnx.load(str(path))
    fp32 = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    ops = [n.op_type for n in model.graph.node]
    return {"matmulnbits": ops.count("MatMulNBits"), "matmul": ops.count("MatMul"), "fp32_weight_bytes": fp32}


def ort_perplexity(onnx_path, token_ids, *, window: int, threads: int = 2):
    """Perplexity (slimgraph's windowing, see compiler/evaluation.py) of an ONNX logits model under ORT."""
    import onnxruntime as ort

    from slimgraph.compiler.evaluation import perplexity

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return perplexity(lambda batch: session.run(["logits"], {"input_ids": batch})[0], token_ids, window=window)


def eval_tokens(folder, max_tokens: int | None) -> np.ndarray:
    """Exactly the token ids ``slimgraph eval`` scores: the Wikipedia eval slice, model tokenizer, first N."""
    from slimgraph.compiler.cli_eval import text_tokens

    return text_tokens(folder, None, max_tokens)


def calibration_sequences(folder, n_sequences: int = 32, length: int = 512) -> list[np.ndarray]:
    """Consecutive, non-overlapping ``length``-token pieces from the start of the calibration split."""
    from transformers import AutoTokenizer

    from slimgraph.models.wiki_text import wiki_split

    text = wiki_split().calibration.read_text(encoding="utf-8")
    ids = np.asarray(AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"], np.int64)
    if ids.size < n_sequences * length:
        raise ValueError(f"calibration text has {ids.size} tokens, fewer than {n_sequences} x {length}")
    return list(ids[:n_sequences * length].reshape(n_sequences, length))


@dataclass(frozen=True)
class OrtQuantSettings:
    """What :func:`run_ort_rows` measures; the defaults are the acceptance setting (int4, groups of 128)."""

    methods: tuple[str, ...] = ("default", "rtn", "gptq")
    schemes: tuple[str, ...] = ("asym", "sym")      # asym is ORT's default
    bits: int = 4
    block_size: int = 128
    max_tokens: int | None = None                   # None: the whole evaluation slice, like `slimgraph eval`
    window: int = 512
    calib_sequences: int = 32
    calib_len: int = 512
    lm_head: bool = False
    threads: int = 2
    force: bool = False                             # re-quantize even when bench/.work holds the model
    fix_zero_points: bool = True


def _quantized_path(method: str, symmetric: bool, cfg: OrtQuantSettings) -> Path:
    calib = f"-c{cfg.calib_sequences}x{cfg.calib_len}" if method == "gptq" else ""
    tags = f"{'sym' if symmetric else 'asym'}{'-lmhead' if cfg.lm_head else ''}{calib}"
    return WORK_DIR / f"{MODEL}-ort-{method}-int{cfg.bits}-g{cfg.block_size}-{tags}.onnx"


def _score(row: dict, path: Path, tokens, cfg: OrtQuantSettings) -> dict:
    t0 = time.perf_counter()
    result = ort_perplexity(path, tokens, window=cfg.window, threads=cfg.threads)
    row.update(perplexity=result.perplexity, predicted_tokens=result.predicted_tokens, window=cfg.window,
               eval_seconds=time.perf_counter() - t0, model_bytes=model_bytes(path), **weight_summary(path),
               status="ok")
    return row


def _quantized_row(row: dict, fp32: Path, cfg: OrtQuantSettings, tokens, calibration) -> dict:
    """Quantize (or reuse the cached file) and score; a failure becomes a 'could not run: ...' row."""
    method, symmetric = row["method"], row["symmetric"]
    path = _quantized_path(method, symmetric, cfg)
    row["quantize_seconds"] = None
    try:
        reason = gptq_unavailable_reason() if method == "gptq" else None
        if reason:
            raise RuntimeError(reason)
        if cfg.force or not path.is_file():
            t0 = time.perf_counter()
            quantize_matmul_nbits(fp32, path, method=method, bits=cfg.bits, block_size=cfg.block_size,
                                  symmetric=symmetric, calibration_ids=calibration() if method == "gptq" else None,
                                  lm_head=cfg.lm_head, fix_zero_points=cfg.fix_zero_points)
            row["quantize_seconds"] = time.perf_counter() - t0
        return _score(row, path, tokens, cfg)
    except Exception as exc:  # noqa: BLE001 - the bench reports the row instead of dropping it
        return {**row, "perplexity": None, "status": f"could not run: {type(exc).__name__}: {exc}"}


def run_ort_rows(cfg: OrtQuantSettings = OrtQuantSettings()) -> list[dict]:
    """Rows {tool, method, bits, group, symmetric, perplexity, model_bytes, seconds, ...}: fp32, then methods.

    The fp32 model is the export shared with bench/stage1_latency.py (bench/.work/smollm2.onnx).
    ``seconds`` is quantization plus perplexity time of the row; ``quantize_seconds`` is None when the
    cached quantized model was reused.
    """
    import onnxruntime
    from stage1_latency import onnx_file

    from slimgraph.models.registry import resolve_model

    folder = resolve_model(MODEL).path
    tokens = eval_tokens(folder, cfg.max_tokens)
    fp32 = onnx_file(MODEL, str(folder))
    calibration = functools.cache(lambda: calibration_sequences(folder, cfg.calib_sequences, cfg.calib_len))
    base = {"model": MODEL, "eval_tokens": int(tokens.size), "threads": cfg.threads,
            "tool": f"onnxruntime {onnxruntime.__version__}"}
    rows = [_score({**base, "method": "fp32", "bits": 32, "group": None, "symmetric": None,
                    "quantize_seconds": 0.0}, fp32, tokens, cfg)]
    for method in cfg.methods:
        for scheme in cfg.schemes:
            row = {**base, "method": method, "bits": cfg.bits, "group": cfg.block_size, "symmetric": scheme == "sym",
                   "lm_head_quantized": cfg.lm_head,
                   "calibration": f"{cfg.calib_sequences}x{cfg.calib_len} tokens" if method == "gptq" else None,
                   "zero_points_repacked": scheme == "asym" and method != "default" and cfg.fix_zero_points}
            rows.append(_quantized_row(row, fp32, cfg, tokens, calibration))
    for row in rows:
        row["seconds"] = (row.get("quantize_seconds") or 0.0) + row.get("eval_seconds", 0.0)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'method':8s} {'scheme':6s} {'bits':>4s} {'group':>5s} {'perplexity':>10s} {'MB':>6s} {'quant s':>7s}  status")
    for r in rows:
        scheme = {None: "-", True: "sym", False: "asym"}[r["symmetric"]]
        ok, qs = r["status"] == "ok", r["quantize_seconds"]
        numbers = f"{r['perplexity']:10.4f} {r['model_bytes'] / 1e6:6.1f}" if ok else f"{'-':>10s} {'-':>6s}"
        print(f"{r['method']:8s} {scheme:6s} {r['bits']:4d} {str(r['group']):>5s} {numbers} "
              f"{'cached' if qs is None else f'{qs:.0f}':>7s}  {r['status']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="default,rtn,gptq", help="comma list of default, rtn, gptq")
    parser.add_argument("--schemes", default="asym,sym", help="comma list of asym (ORT's default), sym")
    for flag, default in (("bits", 4), ("block-size", 128), ("max-tokens", None), ("window", 512),
                          ("calib-sequences", 32), ("calib-len", 512), ("threads", 2)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--lm-head", action="store_true", help="also quantize the tied lm_head MatMul")
    parser.add_argument("--no-zp-fix", action="store_true", help="keep ORT's asym zero-point packing (fails)")
    parser.add_argument("--force", action="store_true", help="re-quantize even if a cached model exists")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/ort-quant-<date>)")
    args = parser.parse_args()
    options = {k: v for k, v in vars(args).items() if k not in ("methods", "schemes", "no_zp_fix", "out")}
    cfg = OrtQuantSettings(methods=tuple(args.methods.split(",")), schemes=tuple(args.schemes.split(",")),
                           fix_zero_points=not args.no_zp_fix, **options)
    rows = run_ort_rows(cfg)
    print_rows(rows)
    data = {"settings": asdict(cfg), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {args.out or write_results('ort-quant', data)}")


if __name__ == "__main__":
    main()
