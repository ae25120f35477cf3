"""Weight quantization of linear layers: round-to-nearest, GPTQ or AWQ, stored packed.

Each chosen layer ``matmul(x, @W)`` (W: [K, N] float32) becomes::

    matmul(x, dequantize(@W.qweight, @W.scales[, @W.zeros]))          (RTN, GPTQ)
    matmul(mul(x, @W.awq_inv_scale), dequantize(...))                 (AWQ: x/s times Q(s W))

and, with ``activations = "int8"``, x is rounded to 8-bit codes first (``dynamic_quantize``, one
run-time scale per ``activation_block`` values of each row; layers whose K is not a multiple of
the block keep float inputs, reported per layer), so CPUs with 8-bit dot products multiply codes
by codes in integers.

with the codes packed into uint32 words and float16 group scales (see
:mod:`slimgraph.passes.quant_format`). Fusion later puts ``dequantize`` (and the AWQ scaling of
x) into the matmul's kernel, so the float matrix never exists at run time. A token embedding
tied to the quantized LM head (``take(@W, ids, axis=1)``) gathers packed columns first and
dequantizes only what it picked; an untied embedding table is quantized the same way
(:mod:`slimgraph.passes.quantize_embedding`).

Methods: RTN quantizes each group independently. GPTQ minimizes ``||X W - X W_hat||^2`` column
by column with the inverse Hessian ``H = E[x x^T]`` of the layer's inputs, compensating each
rounding error on the rows not yet quantized. AWQ searches a per-input-channel scale
``s = mean|x|^alpha`` (shared by the layers reading the same x) that protects the weights of
salient channels, then (``awq_clip``) shrinks each group's range where that lowers the group's
output error -- except for queries and keys, whose errors the attention scores multiply together
and whose outlier channels the softmax is most sensitive to (as the AWQ reference does), and never
where it would raise the error of the calibration rows with the largest activations. Statistics
come from the unquantized module in one calibration run.

A K that is not a multiple of the group size gets a shorter last group (reported per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import groupby

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.errors import CompressionError
from slimgraph.compiler.ir import Module, Node
from slimgraph.compiler.passmanager import PassInfo, PassResult
from slimgraph.compiler.recipe import QuantizeSettings
from slimgraph.passes._compress import (CompressionContext, layer_row, rewrite_readers, select_layers, summarize,
                                        weight_matrix)
from slimgraph.passes._linear import LinearLayer, feeds_attention_scores, output_sqnr_db
from slimgraph.passes._rewrite import Rewriter, add_weight
from slimgraph.passes.quantize_embedding import RowGather, select_tables, table_row
from slimgraph.passes.quant_format import QuantizedMatrix, QuantSpec


@dataclass(frozen=True)
class QuantizedWeight:
    """The packed weights replacing one matrix, and how its readers use them (a Replacement)."""

    words: str
    scales: str
    zeros: str | None
    spec: QuantSpec
    rows: int
    group: int
    inv_scale: str | None = None       # AWQ: 1/s per input channel, [K]
    inv_scale_column: str | None = None  # the same as [K, 1, ...] for gathered columns
    activation_block: int | None = None  # matmul inputs rounded to 8-bit codes per block of this many values

    def _dequantize(self, rw: Rewriter, inputs: list, name: str) -> str:
        attrs = {"bits": self.spec.bits, "group_size": self.group, "rows": self.rows}
        return rw.add(ops.DEQUANTIZE, inputs, attrs, name=name)

    def _packed(self) -> list:
        return [self.words, self.scales] + ([self.zeros] if self.zeros else [])

    def matmul(self, rw: Rewriter, node: Node, x: str) -> str:
        if self.inv_scale is not None:
            x = rw.add(ops.MUL, [x, self.inv_scale], name=f"{node.name}_awq_input")
        if self.activation_block is not None:
            x = rw.add(ops.DYNAMIC_QUANTIZE, [x], {"bits": 8, "block": self.activation_block},
                       name=f"{node.name}_input_codes")
        w = self._dequantize(rw, self._packed(), f"{node.name}_weight")
        return rw.add(ops.MATMUL, [x, w], name=node.name)

    def take(self, rw: Rewriter, node: Node) -> str | None:
        axis = node.attrs["axis"] % rw.type_of(node.inputs[0]).rank
        if axis == 0:
            return None
        ids = rw.ref(node.inputs[1])
        picked = [rw.add(ops.TAKE, [ref, ids], {"axis": axis}, name=f"{node.name}_packed") for ref in self._packed()]
        name = node.name if self.inv_scale is None else f"{node.name}_scaled"
        out = self._dequantize(rw, picked, name)
        if self.inv_scale_column is not None:
            out = rw.add(ops.MUL, [out, self.inv_scale_column], name=node.name)
        return out


def _spec(settings: QuantizeSettings) -> QuantSpec:
    float_zero = settings.zero_point == "float" and not settings.symmetric   # symmetric codes have no zero point
    return QuantSpec(settings.bits, settings.group_size, settings.symmetric, float_zero)


def _pad_rows(w: np.ndarray, hessian: np.ndarray | None, group: int):
    """Pad K to a multiple of the group with copies of the last row (the last group's range is
    unchanged); padded Hessian rows are independent and tiny, so they never steer real rows."""
    extra = -w.shape[0] % group
    if extra == 0:
        return w, hessian
    w = np.concatenate([w, np.repeat(w[-1:], extra, axis=0)])
    if hessian is not None:
        k = hessian.shape[0]
        padded = np.zeros((k + extra, k + extra))
        padded[:k, :k] = hessian
        padded[k:, k:] = np.eye(extra) * 1e-8 * max(float(np.mean(np.diag(hessian))), 1e-12)
        hessian = padded
    return w, hessian


def _trim(q: QuantizedMatrix, rows: int) -> QuantizedMatrix:
    return QuantizedMatrix(q.codes[:rows], q.scales, q.zeros, q.spec)


def _quantize_one(w: np.ndarray, settings: QuantizeSettings, stats) -> QuantizedMatrix:
    from slimgraph.passes.gptq import gptq_quantize
    from slimgraph.passes.quantizers import quantize_rtn

    spec = _spec(settings)
    group = spec.group_for(w.shape[0])
    if settings.method == "gptq":
        padded, h = _pad_rows(w, stats.hessian, group)
        q = gptq_quantize(padded, h, spec, damp=settings.damp, act_order=settings.act_order)
    else:
        padded, _ = _pad_rows(w, None, group)
        q = quantize_rtn(padded, spec)
    return _trim(q, w.shape[0])


def _quantize_awq(ws: list, settings: QuantizeSettings, stats, clips: list[bool]):
    from slimgraph.passes.awq import awq_quantize

    spec = _spec(settings)
    group = spec.group_for(ws[0].shape[0])
    padded = [_pad_rows(w, None, group)[0] for w in ws]
    extra = padded[0].shape[0] - ws[0].shape[0]
    pad = lambda rows: np.pad(rows, ((0, 0), (0, extra)))  # noqa: E731
    peaks = stats.peaks if stats.peaks is not None else np.zeros((0, ws[0].shape[0]), np.float32)
    result = awq_quantize(padded, pad(stats.sample), spec, clip_search=[settings.awq_clip and c for c in clips],
                          peak_rows=pad(peaks))
    scale = np.asarray(result.input_scale, np.float32)[: ws[0].shape[0]]
    return scale, [_trim(q, ws[0].shape[0]) for q in result.matrices]


class QuantizePass:
    """Quantize linear-layer weights per the recipe (RTN / GPTQ / AWQ), packed, dequantized in-kernel."""

    def __init__(self, context: CompressionContext):
        self.context = context

    def __call__(self, module: Module) -> PassResult:
        chosen = select_layers(module, self.context.recipe, "quantize")
        chosen = [(layer, s) for layer, s in chosen if _readers_supported(module, layer)]
        tables = select_tables(module, self.context.recipe)
        if not chosen and not tables:
            return PassResult(module, False, summarize([]))
        needs = any(s.needs_calibration for _, s in chosen)
        inputs = {layer.input for layer, _ in chosen}
        stats = (self.context.stats(module, inputs, "GPTQ/AWQ quantization") if needs
                 else self.context.optional_stats(module, inputs))
        weights = dict(module.weights)
        replacements, rows = {}, []
        key = lambda item: (item[0].function, item[0].input, item[1])  # noqa: E731
        for (_, _, settings), group in groupby(sorted(chosen, key=lambda i: _order(i, chosen)), key=key):
            group = list(group)
            self._quantize_group(module, group, settings, stats, weights, replacements, rows)
        for table, settings in tables:
            _quantize_table(module, table, settings, weights, replacements, rows)
        new = rewrite_readers(module, weights, replacements)
        bytes_before = sum(r["bytes_before"] for r in rows)
        bytes_after = sum(r["bytes_after"] for r in rows)
        return PassResult(new, True, summarize(rows, bytes_before=bytes_before, bytes_after=bytes_after))

    def _quantize_group(self, module, group, settings, stats, weights, replacements, rows) -> None:
        layers = [layer for layer, _ in group]
        ws = [weight_matrix(module, layer) for layer in layers]
        layer_stats = stats.get(layers[0].input)
        try:
            if settings.method == "awq":
                clips = [not feeds_attention_scores(module.functions[l.function], l.node) for l in layers]
                scale, matrices = _quantize_awq(ws, settings, layer_stats, clips)
            else:
                scale, matrices = None, [_quantize_one(w, settings, layer_stats) for w in ws]
        except ValueError as exc:
            names = ", ".join(layer.name for layer in layers)
            raise CompressionError(f"cannot quantize layer(s) {names} ({settings.method}, {settings.bits} bits): {exc}") from None
        for layer, w, q in zip(layers, ws, matrices):
            replacements[layer.weight] = replace(_store(weights, layer, q, scale),
                                                 activation_block=_activation_block(layer, settings))
            w_hat = q.dequantize() if scale is None else q.dequantize() / scale[:, None]
            sample = None if layer_stats is None else layer_stats.sample
            sqnr = None if sample is None or not len(sample) else output_sqnr_db(sample, w, w_hat)
            rows.append(_row(layer, settings, q, sqnr))


def _quantize_table(module, table: LinearLayer, settings, weights, replacements, rows) -> None:
    """An embedding table, stored transposed (see :mod:`slimgraph.passes.quantize_embedding`)."""
    array = weight_matrix(module, table)
    try:
        q = _quantize_one(np.ascontiguousarray(array.T), replace(settings, method="rtn"), None)
    except ValueError as exc:
        raise CompressionError(f"cannot quantize embedding table {table.weight}: {exc}") from None
    replacements[table.weight] = RowGather(_store(weights, replace(table, weight=f"{table.weight}.T"), q, None))
    rows.append(table_row(table, settings, q, array))


def _order(item, chosen) -> tuple:
    layer, settings = item
    return (layer.function, layer.input, repr(settings), [c[0] for c in chosen].index(layer))


def _readers_supported(module: Module, layer: LinearLayer) -> bool:
    """Every reader of the weight is a matmul using it as W, or a gather of its columns."""
    ref = "@" + layer.weight
    for fn in module.entries:
        for node in fn.nodes:
            if ref not in node.inputs:
                continue
            as_matmul = node.op is ops.MATMUL and node.inputs == (node.inputs[0], ref) and node.inputs[0] != ref
            as_take = node.op is ops.TAKE and node.inputs[0] == ref and node.attrs["axis"] % 2 == 1
            if not (as_matmul or as_take):
                return False
    return True


def _store(weights: dict, layer: LinearLayer, q: QuantizedMatrix, scale: np.ndarray | None) -> QuantizedWeight:
    base = layer.weight
    words = add_weight(weights, f"{base}.qweight", q.packed())
    scales = add_weight(weights, f"{base}.scales", q.scales)
    zeros = add_weight(weights, f"{base}.zeros", q.zeros) if q.zeros is not None else None
    inv = column = None
    if scale is not None:
        inv = add_weight(weights, f"{base}.awq_inv_scale", (1.0 / scale).astype(np.float32))
        column = add_weight(weights, f"{base}.awq_inv_scale_column", (1.0 / scale).astype(np.float32)[:, None, None])
    return QuantizedWeight(words, scales, zeros, q.spec, layer.k, q.group_size, inv, column)


def _activation_block(layer: LinearLayer, settings: QuantizeSettings) -> int | None:
    """The block of the layer's 8-bit inputs, or None (float inputs)."""
    if settings.activations != "int8" or layer.k % settings.activation_block:
        return None
    return settings.activation_block


def _row(layer: LinearLayer, settings: QuantizeSettings, q: QuantizedMatrix, sqnr) -> dict:
    extra = {"bits": settings.bits, "group_size": q.group_size, "symmetric": settings.symmetric,
             "bytes_before": layer.params * 4, "bytes_after": q.storage_bytes}
    if settings.activations != "float":
        block = _activation_block(layer, settings)
        extra["activations"] = (f"{settings.activations}, block {block}" if block is not None else
                                f"float (K={layer.k} is not a multiple of block {settings.activation_block})")
    if layer.k % q.group_size:
        extra["fallback"] = f"K={layer.k} is not a multiple of group {q.group_size}: last group has {layer.k % q.group_size} rows"
    return layer_row(layer, f"{settings.method}-{q.spec.label()}", layer.params, sqnr, **extra)


def quantize_pass(context: CompressionContext) -> PassInfo:
    return PassInfo("quantize", QuantizePass(context), QuantizePass.__doc__, lossy=True)
