"""Merge matrix products that share their left operand into one product (``merge_parallel_products``).

A transformer layer multiplies one normalized activation by several weights: the query, key and
value projections all read the same ``x``, and so do the gate and up projections of a gated MLP.
Concatenating the weights along their columns gives one product whose column blocks are the
separate results::

    x @ [W_1 | W_2 | ... | W_m] = [x @ W_1 | x @ W_2 | ... | x @ W_m]

so ``y_i = x @ W_i`` becomes ``slice(x @ W_cat, axis=-1, start=c_i, end=c_i + N_i)`` with
``c_i = N_1 + ... + N_(i-1)``. Every output column is the same dot product over the same K values
as before; only the kernel that computes it changes. One product instead of m means one kernel
launch instead of m and one pass over ``x``; at one token (a decoding step) each product is a
matrix-vector product bound by reading its weight, and a wider one keeps more of the memory system
busy per launch (on a GPU, the q/k/v products of a 1.1B-parameter model are 2 MB, 0.26 MB and
0.26 MB of int4 codes each -- too small to reach full bandwidth one by one).

Quantized weights merge the same way. ``dequantize(words, scales, zeros)`` works column by column
(group g of rows of column n uses ``scales[g, n]`` and ``zeros[g, n]``), so concatenating the packed
words, the scales and the zero points along the columns dequantizes to the concatenated matrix,
provided every member has the same bits, group size, row count K and output dtype.

What merges: ``matmul(x, W)`` where W is a 2-D weight or a ``dequantize`` of weights read by that
product alone, grouped by (x, the product's attributes, K, the weight's kind and dtypes). An
optional ``cast`` that is the product's only user (the float16 result of a float32 accumulation)
merges with it, so the slices read the cast result. The merged product sits where the first
member was; the slices take over the names of the values they replace. Weights no longer read by
any function are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Function, Module, Node, Weight
from slimgraph.compiler.passmanager import PassResult, register_pass
from slimgraph.passes._rewrite import Rewriter, add_weight


@dataclass(frozen=True)
class Product:
    """One mergeable product: its matmul, the dequantize of its weight (or None), its cast (or None)."""

    matmul: Node
    weights: tuple            # "@name" refs: the float weight, or the dequantize's words/scales/zeros
    dequantize: Node | None
    cast: Node | None

    @property
    def result(self) -> Node:
        return self.cast if self.cast is not None else self.matmul

    @property
    def nodes(self) -> tuple:
        return tuple(n for n in (self.dequantize, self.matmul, self.cast) if n is not None)


def _product(node: Node, producers: dict[str, Node], users: dict[str, list], outputs: set) -> Product | None:
    """``node`` as a mergeable product, or None."""
    if node.op is not ops.MATMUL or node.inputs[0].startswith("@"):
        return None
    right = node.inputs[1]
    dequantize = producers.get(right)      # None for a weight
    if right.startswith("@"):
        weights = (right,)
    elif (dequantize is not None and dequantize.op is ops.DEQUANTIZE and right not in outputs
          and len(users.get(right, ())) == 1 and all(i.startswith("@") for i in dequantize.inputs)):
        weights = dequantize.inputs
    else:
        return None
    mine = users.get(node.name, ())
    cast = mine[0] if len(mine) == 1 and mine[0].op is ops.CAST and node.name not in outputs else None
    return Product(node, weights, dequantize, cast)


def _plain_matrix(module: Module, ref: str) -> bool:
    weight = module.weights.get(ref[1:])
    return weight is not None and weight.has_data and weight.type.rank == 2


def _group_key(product: Product, module: Module) -> tuple:
    """Products with equal keys can share one concatenated weight."""
    types = tuple((module.weights[w[1:]].type.dtype, module.weights[w[1:]].type.shape[:-1])
                  for w in product.weights)
    deq = product.dequantize
    return (product.matmul.inputs[0], product.matmul.attrs, deq.attrs if deq is not None else None,
            types, product.cast.attrs if product.cast is not None else None)


def parallel_groups(fn: Function, module: Module) -> list[list[Product]]:
    """The groups of at least two products of ``fn`` that read the same left operand."""
    producers = fn.node_map()
    users = fn.users()
    outputs = set(fn.outputs)
    groups: dict[tuple, list[Product]] = {}
    for node in fn.nodes:
        product = _product(node, producers, users, outputs)
        if product is not None and all(_plain_matrix(module, w) for w in product.weights):
            groups.setdefault(_group_key(product, module), []).append(product)
    return [g for g in groups.values() if len(g) > 1]


def merged_weight_name(names: list[str]) -> str:
    """``a.q_proj.w`` + ``a.k_proj.w`` -> ``a.q_proj_k_proj.w`` (common dotted prefix and suffix kept)."""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) - tail - 1 > head and p[-tail - 1] == parts[0][-tail - 1] for p in parts):
        tail += 1
    middles = ["_".join(p[head:len(p) - tail]) for p in parts]
    return ".".join(parts[0][:head] + ["_".join(middles)] + (parts[0][len(parts[0]) - tail:] if tail else []))


class _Merger:
    """Rewrites one function, merging its groups."""

    def __init__(self, module: Module, fn: Function, weights: dict[str, Weight], merged: dict[tuple, str]):
        self.rw = Rewriter(module, fn, weights)
        self.merged = merged      # member weight refs -> their concatenation, shared by the entries
        self.groups = parallel_groups(fn, module)
        self.first = {g[0].matmul.name: g for g in self.groups}
        self.skipped = {n.name for g in self.groups for p in g for n in p.nodes}

    def run(self) -> Function:
        for node in self.rw.fn.nodes:
            if node.name in self.first:
                self.emit(self.first[node.name])
            elif node.name not in self.skipped:
                self.rw.keep(node)
        return self.rw.finish()

    def concatenated(self, group: list[Product], index: int) -> str:
        """The concatenation of the members' ``index``-th weights (made once: prefill and decode
        read the same weights)."""
        refs = tuple(p.weights[index] for p in group)
        if refs not in self.merged:
            arrays = [self.rw.weights[r[1:]].array for r in refs]
            self.merged[refs] = add_weight(self.rw.weights, merged_weight_name([r[1:] for r in refs]),
                                           np.ascontiguousarray(np.concatenate(arrays, axis=1)))
        return self.merged[refs]

    def emit(self, group: list[Product]) -> None:
        rw, lead = self.rw, group[0]
        weights = [self.concatenated(group, i) for i in range(len(lead.weights))]
        right = weights[0]
        if lead.dequantize is not None:
            right = rw.add(ops.DEQUANTIZE, weights, dict(lead.dequantize.attrs.items()),
                           name=f"{lead.matmul.name}_weights")
        value = rw.add(ops.MATMUL, [rw.ref(lead.matmul.inputs[0]), right], dict(lead.matmul.attrs.items()),
                       name=f"{lead.matmul.name}_merged")
        if lead.cast is not None:
            value = rw.add(ops.CAST, [value], dict(lead.cast.attrs.items()), name=f"{value}_cast")
        axis, start = rw.type_of(value).rank - 1, 0
        for product in group:
            width = product.result.type.shape[-1]
            piece = rw.add(ops.SLICE, [value], {"axis": axis, "start": start, "end": start + width},
                           name=product.result.name)
            rw.replace(product.result, piece)
            start += width


@register_pass("merge_parallel_products")
def merge_parallel_products(module: Module) -> PassResult:
    """Concatenate the weights of products sharing a left operand (q/k/v, gate/up) into one product."""
    weights, concatenations = dict(module.weights), {}
    functions, merged, groups = {}, 0, 0
    for name, fn in module.functions.items():
        merger = _Merger(module, fn, weights, concatenations)
        if not merger.groups:
            functions[name] = fn
            continue
        functions[name] = merger.run()
        groups += len(merger.groups)
        merged += sum(len(g) for g in merger.groups)
    if not groups:
        return PassResult(module, False, {"groups": 0, "products_merged": 0})
    result = Module(functions, weights, module.metadata)
    used = result.used_weights()
    dropped = module.used_weights() - used
    kept = {name: w for name, w in weights.items() if name not in dropped}
    return PassResult(result.with_weights(kept), True, {"groups": groups, "products_merged": merged,
                                                        "weights_dropped": len(dropped)})
