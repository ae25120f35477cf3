"""Column panels for the weights of matrix products (``pack_weights``): float32 matrices and the
packed words of quantized ones on CPUs, the packed words transposed on GPUs.

A product ``y = x @ W`` with a weight ``W [K, N]`` reads all of W. A decoding step has one row of
x, so its speed is the rate at which W streams from memory. The one-row kernels split the N
columns into tiles, one task each; in W's row-major layout a tile of P columns is ``4 P`` bytes
of every row, rows ``4 N`` bytes apart: a strided walk that leaves a 4 KB page every few rows,
where the hardware prefetchers lose track (on a 2-core x86 machine a [576, 49152] one-row
product streamed 13 GB/s in this layout and 32 GB/s from panels). Stored as column panels::

    Wp[p, k, c] = W[k, p P + c]            Wp: [N / P, K, P]

a tile is one contiguous block of ``K P`` values. Every reader of W reads it back through

    W = reshape(transpose(Wp, [1, 0, 2]), [K, N])

a chain of its own per reader, which fusion puts into the reader's kernel as a prologue: the
kernel indexes Wp directly and no [K, N] copy exists at run time. P is the width of the target's
GEMM micro tile (four vector registers of float32: 64 on AVX-512, 16 on NEON), so the prompt's
GEMM packs its B panels from contiguous rows of Wp as it did from W.

The packed uint32 words of a quantized weight (``[K / codes per word, N]``, read by ``dequantize``
inside the product's kernel) are column panels the same way: the one-row products over them
(``_quantized_gemv``, ``_integer_gemv``) walk one tile of columns down all word rows, as the float
ones do (a [576, 49152] int4 one-row product with 8-bit activations took 2.95 ms row-major and
1.50 ms from panels on the 2-core machine). Their scales and zero points (a few group rows) stay,
except with ``group_params`` (GPUs), where the scales and zero points of packed words are panels too.

On GPUs the words are stored with P = 1: ``Wp[n, k, 0] = W[k, n]``, the transposed matrix, each
output's words contiguous along K. That is the layout TVM's DLight ``GEMV`` rule schedules (warps
reduce along the contiguous axis with wide loads and shuffles); over ``[K, N]`` words the one-token
products take slimgraph's ``ColumnGEMV`` instead (``backends/schedules/gpu_gemv.py``). The target
chooses by shape (``select``, ``backends/targets_cuda.py``): the transposed read won on wide
products and short rows, and with slimgraph's ``RowGEMV`` wherever K is a multiple of 256; the
kernels of both layouts are timed side by side by ``bench/stage3_cuda_gemv.py``. There the scales and
zero points ``[K / group, N]`` are transposed with their words (``group_params``), so the lanes of a
warp reading one output's row read its scales from one contiguous run instead of one 32-byte sector
per group (a 1.1B LLaMA's int4 one-token step: 0.795 -> 0.747 ms on an H100).

A weight is packed when it is a 2-D float32 weight or uint32 words (of the target's ``dtypes``), N
is a multiple of P larger than P, ``select`` (if any) accepts its [K, N], and every reader is a
``matmul`` taking it as its right operand, a ``take`` of its columns (a token embedding tied to the
LM head) or a ``dequantize`` taking it as its words (or, with ``group_params``, as its scales or zero
points, when its words are packed). Any other reader would need the [K, N] layout
materialized, so such weights stay as they are.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Function, Module, Node, Weight
from slimgraph.compiler.passmanager import PassInfo, PassResult
from slimgraph.compiler.types import DType
from slimgraph.passes._rewrite import Rewriter, add_weight

PASS_NAME = "pack_weights"
SUFFIX = ".panels"
PACKED_DTYPES = (DType.f32, DType.u32)   # float weights, packed low-bit codes
MatrixFilter = Callable[[int, int], bool]  # (K, N) of a weight's matrix -> pack it?


def _reads_as_panel_source(node: Node, ref: str) -> bool:
    """Whether ``node`` can read weight ``ref`` through the reconstruction chain inside its kernel
    (a ``dequantize`` reads its words, scales and zero points so)."""
    if node.op is ops.MATMUL:
        return node.inputs[1] == ref and ref not in node.inputs[:1]
    if node.op is ops.DEQUANTIZE:
        return node.inputs.count(ref) == 1
    return node.op is ops.TAKE and node.inputs[0] == ref and node.attrs["axis"] in (1, -1)


def _readers(module: Module) -> tuple[dict[str, bool], dict[str, int], dict[str, set]]:
    """Per weight: whether every reader reads it as a panel source; the rows K a ``dequantize``
    unpacks it to (words, scales, zero points); the words whose ``dequantize`` reads it as scales
    or zero points."""
    readable: dict[str, bool] = {}
    matrix_rows: dict[str, int] = {}
    words_of: dict[str, set] = {}
    for fn in module.entries:
        for node in fn.nodes:
            for ref in set(node.inputs):
                if ref.startswith("@"):
                    readable[ref[1:]] = readable.get(ref[1:], True) and _reads_as_panel_source(node, ref)
                    if node.op is ops.DEQUANTIZE:
                        matrix_rows[ref[1:]] = node.attrs["rows"]
                        if node.inputs[0] != ref:
                            words_of.setdefault(ref[1:], set()).add(node.inputs[0][1:])
    return readable, matrix_rows, words_of


def packable_weights(module: Module, columns: int, dtypes: tuple = PACKED_DTYPES,
                     select: MatrixFilter | None = None, group_params: bool = False) -> list[str]:
    """Names of the weights of ``dtypes`` the pass packs into panels of ``columns`` (see the module
    docstring); with ``select``, only those whose matrix ``[K, N]`` it accepts (K: the rows a
    ``dequantize`` reader unpacks the words to, else the weight's own rows); with ``group_params``,
    also the scales and zero points whose words are all packed."""
    readable, matrix_rows, words_of = _readers(module)

    def fits(name: str, kinds: tuple) -> bool:
        weight = module.weights.get(name)
        if not readable[name] or weight is None or not weight.has_data or weight.type.dtype not in kinds:
            return False
        rows, width = weight.type.shape if weight.type.rank == 2 else (0, 0)
        wanted = select is None or select(matrix_rows.get(name, rows), width)
        return width % columns == 0 and width > columns and wanted

    chosen = [name for name in sorted(readable) if name not in words_of and fits(name, dtypes)]
    if group_params:
        chosen += [name for name in sorted(words_of)
                   if words_of[name] <= set(chosen) and fits(name, (DType.f32, DType.f16))]
    return chosen


def to_panels(array: np.ndarray, columns: int) -> np.ndarray:
    """``W [K, N] -> Wp [N / columns, K, columns]`` with ``Wp[p, k, c] = W[k, p columns + c]``."""
    rows, width = array.shape
    return np.ascontiguousarray(array.reshape(rows, width // columns, columns).transpose(1, 0, 2))


def _unpacked(rw: Rewriter, panels: str, shape: tuple, hint: str) -> str:
    """``reshape(transpose(panels, [1, 0, 2]), shape)``: the original [K, N] weight, for one reader."""
    rows, width = shape
    turned = rw.add(ops.TRANSPOSE, [panels], {"perm": (1, 0, 2)}, name=f"{hint}_panels")
    return rw.add(ops.RESHAPE, [turned], {"shape": (rows, width)}, name=f"{hint}_weight")


def _rewrite(module: Module, fn: Function, weights: dict[str, Weight], packed: dict[str, str]) -> Function:
    rw = Rewriter(module, fn, weights)
    for node in fn.nodes:
        inputs = list(rw.inputs(node))
        if not any(ref[1:] in packed for ref in inputs if ref.startswith("@")):
            rw.keep(node)
            continue
        for i, ref in enumerate(inputs):
            if ref.startswith("@") and ref[1:] in packed:
                inputs[i] = _unpacked(rw, packed[ref[1:]], module.weights[ref[1:]].type.shape, node.name)
        rw.add(node.op, inputs, dict(node.attrs.items()), name=node.name, type=node.type)
    return rw.finish()


def pack_weights(module: Module, columns: int, dtypes: tuple = PACKED_DTYPES,
                 select: MatrixFilter | None = None, group_params: bool = False) -> PassResult:
    """Store the packable weights (of ``dtypes``, accepted by ``select``; with ``group_params`` the
    scales and zero points of packed words too) as column panels of ``columns`` and read them back
    per reader."""
    names = packable_weights(module, columns, dtypes, select, group_params)
    if not names:
        return PassResult(module, False, {"weights_packed": 0})
    weights = dict(module.weights)
    packed = {name: add_weight(weights, f"{name}{SUFFIX}", to_panels(module.weights[name].array, columns))
              for name in names}
    for name in names:
        del weights[name]
    functions = dict(module.functions)
    for fn in module.entries:
        functions[fn.name] = _rewrite(module, fn, weights, packed)
    return PassResult(Module(functions, weights, module.metadata), True,
                      {"weights_packed": len(names), "panel_columns": columns})


def pack_weights_pass(columns: int, dtypes: tuple = PACKED_DTYPES, select: MatrixFilter | None = None,
                      description: str | None = None, group_params: bool = False) -> PassInfo:
    """The pass configured for a target: panels as wide as a CPU's GEMM micro tile, or one column
    wide (the transposed matrix) for the quantized words a GPU reads along K (and, with
    ``group_params``, their scales and zero points)."""
    kinds = " and ".join({DType.f32: "float32 matmul weights", DType.u32: "quantized words"}[d] for d in dtypes)
    return PassInfo(PASS_NAME, lambda module: pack_weights(module, columns, dtypes, select, group_params),
                    description or f"{kinds} stored as column panels of {columns}")
