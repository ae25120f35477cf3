"""Small IR modules for kernel tests and the kernel benchmark (``bench/stage3_cuda_gemv.py``): the
one-token int4 product of a decoding step, and a two-layer MLP whose products have the shapes the
CUDA one-token schedules are chosen for.

``int4_product(K, N)`` is ``cast(x @ dequantize(words, scales, zeros))`` with float16 activations
``x [1, 1, K]``, packed words, and float16 scales and zero points per group of ``group`` rows; with
``transposed`` the words are stored ``[N, K / 8, 1]`` and read back through a transpose and a reshape,
as ``pack_weights`` leaves them for CUDA; ``residual`` adds a float16 ``[1, 1, N]`` input (the fused
residual add of an output or down projection); ``norm`` puts the RMS norm of a LLaMA layer (float32,
weight ``g [K]``, rounded to float16) before the product.
"""

from __future__ import annotations

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import FunctionBuilder, Module, Weight
from slimgraph.compiler.types import DType, TensorType


def int4_product(rows: int, outputs: int, *, group: int = 128, transposed: bool = False,
                 residual: bool = False, norm: bool = False) -> Module:
    b = FunctionBuilder("main", {})
    x = b.param("x", TensorType(DType.f16, (1, 1, rows)))
    if norm:   # a LLaMA RMS norm in float32 (eps 1e-5, weight g), rounded to float16
        gamma = b.add(ops.CAST, [b.param("g", TensorType(DType.f16, (rows,)))], {"dtype": DType.f32})
        normed = b.add(ops.RMS_NORM, [b.add(ops.CAST, [x], {"dtype": DType.f32}), gamma], {"eps": 1e-5})
        x = b.add(ops.CAST, [normed], {"dtype": DType.f16})
    if transposed:
        stored = b.param("w", TensorType(DType.u32, (outputs, rows // 8, 1)))
        turned = b.add(ops.TRANSPOSE, [stored], {"perm": (1, 0, 2)})
        words = b.add(ops.RESHAPE, [turned], {"shape": (rows // 8, outputs)})
    else:
        words = b.param("w", TensorType(DType.u32, (rows // 8, outputs)))
    groups = -(-rows // group)
    scales = b.param("s", TensorType(DType.f16, (groups, outputs)))
    zeros = b.param("z", TensorType(DType.f16, (groups, outputs)))
    weight = b.add(ops.DEQUANTIZE, [words, scales, zeros],
                   {"bits": 4, "group_size": group, "rows": rows, "dtype": DType.f16})
    y = b.add(ops.CAST, [b.add(ops.MATMUL, [x, weight], {"out_dtype": DType.f32})], {"dtype": DType.f16})
    if residual:
        y = b.add(ops.ADD, [y, b.param("r", TensorType(DType.f16, (1, 1, outputs)))])
    b.output(y)
    return Module({"main": b.build()}, {})


def two_layer_mlp(width: int = 512, hidden: int = 768, seed: int = 0, *, norm: bool = False) -> Module:
    """``y = relu(x @ W1) @ W2 + x`` over float32 weights with rows that are multiples of 256 (the
    one-token products a CUDA build reads with ``RowGEMV`` once quantized); ``x [1, 1, width]``.
    ``norm``: ``relu(rms_norm(x) @ W1)``, the norm's weight ``g`` a weight of the module."""
    rng = np.random.default_rng(seed)
    weights = {"w1": Weight((rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)),
               "w2": Weight((rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32))}
    if norm:
        weights["g"] = Weight(rng.uniform(0.5, 1.5, width).astype(np.float32))
    b = FunctionBuilder("main", weights)
    x = b.param("x", TensorType(DType.f32, (1, 1, width)))
    first = b.add(ops.RMS_NORM, [x, "@g"], {"eps": 1e-5}) if norm else x
    h = b.add(ops.RELU, [b.add(ops.MATMUL, [first, "@w1"], {})])
    b.output(b.add(ops.ADD, [b.add(ops.MATMUL, [h, "@w2"], {}), x]))
    return Module({"main": b.build()}, weights)
