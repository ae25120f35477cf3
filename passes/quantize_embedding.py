"""Token embedding tables for the quantize pass: a float32 ``E [V, D]`` read only by row gathers
``take(@E, ids)`` (BERT's word embeddings; an embedding tied to the LM head is handled as the LM
head's weight instead).

The table is stored like a linear weight of shape ``[D, V]`` -- ``E^T`` with groups of
``group_size`` along D, codes packed along D -- so a gather of rows of E becomes a gather of
packed columns, dequantized after the gather (only the picked tokens are ever unpacked)::

    take(@E, ids)  ->  transpose(dequantize(take(@E.T.qweight, ids, axis=1), ...), perm=[1, .., r, 0])

There are no activations to calibrate a table on, so it is always rounded to nearest (GPTQ / AWQ
settings fall back to RTN, recorded in the report row) and its error is reported on the weights
themselves: ``weight_sqnr_db = 10 log10(||E||^2 / ||E - E_hat||^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Module, Node
from slimgraph.compiler.recipe import Recipe
from slimgraph.compiler.types import DType
from slimgraph.passes._compress import layer_row
from slimgraph.passes._linear import LinearLayer, layer_name
from slimgraph.passes._rewrite import Rewriter


def embedding_tables(module: Module) -> list[LinearLayer]:
    """Float32 2-D weights whose every reader is ``take(@E, ids)`` along axis 0, as [D, V] layers."""
    readers: dict[str, bool] = {}
    for fn in module.entries:
        for node in fn.nodes:
            for ref in node.inputs:
                if ref.startswith("@"):
                    gather = node.op is ops.TAKE and node.inputs[0] == ref and node.attrs["axis"] == 0
                    readers[ref[1:]] = readers.get(ref[1:], True) and gather
    tables = []
    for name, only_gathers in sorted(readers.items()):
        weight = module.weights.get(name)
        if only_gathers and weight is not None and weight.type.rank == 2 and weight.type.dtype is DType.f32:
            vocab, dim = weight.type.shape
            tables.append(LinearLayer(layer_name(name), module.main.name, "", "", name, dim, vocab))
    return tables


def select_tables(module: Module, recipe: Recipe) -> list[tuple[LinearLayer, object]]:
    chosen = []
    for table in embedding_tables(module):
        settings = recipe.settings_for("quantize", table.name)
        if settings is not None:
            chosen.append((table, settings))
    return chosen


@dataclass(frozen=True)
class RowGather:
    """Replacement for the readers of a quantized table: gathers of its rows."""

    transposed: object     # the QuantizedWeight of E^T

    def matmul(self, rw: Rewriter, node: Node, x: str) -> str | None:
        return None

    def take(self, rw: Rewriter, node: Node) -> str | None:
        ids = rw.ref(node.inputs[1])
        qw = self.transposed
        packed = [rw.add(ops.TAKE, [ref, ids], {"axis": 1}, name=f"{node.name}_packed") for ref in qw._packed()]
        columns = qw._dequantize(rw, packed, f"{node.name}_columns")
        rank = rw.type_of(columns).rank
        return rw.add(ops.TRANSPOSE, [columns], {"perm": list(range(1, rank)) + [0]}, name=node.name)


def table_row(table: LinearLayer, settings, q, table_array: np.ndarray) -> dict:
    e = np.asarray(table_array, np.float64)
    err = e - q.dequantize().T.astype(np.float64)
    noise = float(np.sum(err * err))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(float(np.sum(e * e)) / noise)
    extra = {"bits": settings.bits, "group_size": q.group_size, "symmetric": settings.symmetric,
             "bytes_before": table.params * 4, "bytes_after": q.storage_bytes, "embedding_table": True,
             "weight_sqnr_db": None if not np.isfinite(sqnr) else round(sqnr, 2)}
    if settings.method != "rtn":
        extra["fallback"] = f"{settings.method} needs layer inputs; an embedding table is rounded to nearest"
    return layer_row(table, f"rtn-{q.spec.label()}", table.params, None, **extra)
