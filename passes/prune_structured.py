"""Structured pruning of FFN neurons / hidden channels (recipe step ``structured``).

An FFN block computes ``y = h @ W2`` with ``h = f(x @ W1_1, ..., x @ W1_m)`` applied channel by
channel: channel j of h depends only on column j of every ``W1_i`` ([K, F]) and on entry j of
per-channel weights (biases). Deleting neuron j -- column j of every W1_i and bias, row j of W2
([F, N]) -- therefore changes y by exactly ``-h_j W2[j, :]``, and the kept channels are untouched.
Neurons are ranked by :func:`~slimgraph.passes.pruning_criteria.neuron_importance`, the RMS of
that contribution, ``sqrt(E[h_j^2]) * ||W2[j, :]||`` (calibration ``sq_mean`` of h), or, without
calibration data, the weight-only proxy ``||W2[j, :]|| * prod_i ||W1_i[:, j]||``.

The block is found by generic IR analysis (no op names): from L2 = ``matmul(h, @W2)`` walk back
from h through ELEMENTWISE nodes and reshapes that keep the last axis (``[T, F] -> [1, T, F]``),
all with F channels on the last axis. The walk's leaves must be linear layers
``L1_i = matmul(x, @W1_i)`` with ``W1_i`` [K, F], weights broadcast along the last axis (``[F]`` or
``[1, ..., F]``, sliced) or scalars (one-element constants and weights, kept). Every node of the
chain (and every L1 output) must be used only inside the chain, and no weight of the block may be
read elsewhere. This covers LLaMA's ``silu(x @ Wg) * (x @ Wu) @ Wd`` and GPT-2 / BERT's
``gelu(x @ W1 + b1) @ W2`` (GPT-2's tanh-GELU spelled out in primitives included).

``F' = F - round(ffn_ratio * F)`` neurons are kept, rounded *up* to a multiple of
``settings.multiple`` (kernel-friendly widths); a block where that keeps all F is skipped (with the
reason). The function is rebuilt with sliced weights (``<W>.pruned``; the old ones leave the
module) and re-inferred types for the chain nodes. The ratio applies to the current width, so
running the pass again prunes again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Function, Module, Node
from slimgraph.compiler.ops import OpCategory
from slimgraph.compiler.passmanager import PassInfo, PassResult
from slimgraph.compiler.recipe import StructuredSettings
from slimgraph.compiler.types import TensorType
from slimgraph.passes._compress import CompressionContext, layer_row, summarize
from slimgraph.passes._linear import LinearLayer, find_linear_layers, output_sqnr_db
from slimgraph.passes._rewrite import Rewriter, add_weight
from slimgraph.passes.prune import skip_row
from slimgraph.passes.pruning_criteria import neuron_importance


@dataclass
class FfnBlock:
    """``down`` (L2) reads h, computed channel-wise by ``chain`` from the ``ups`` (L1) outputs."""

    down: LinearLayer
    ups: list[LinearLayer] = field(default_factory=list)
    chain: dict[str, Node] = field(default_factory=dict)
    channel_weights: set[str] = field(default_factory=set)   # [F] / [1,...,F] weights (biases)

    @property
    def width(self) -> int:
        return self.down.k

    def weights(self) -> list[str]:
        return [u.weight for u in self.ups] + [self.down.weight] + sorted(self.channel_weights)

    def nodes(self) -> set[str]:
        return set(self.chain) | {u.node for u in self.ups} | {self.down.node}


class _NoBlock(Exception):
    pass


def _is_scalar(t: TensorType) -> bool:
    return all(d == 1 for d in t.shape)


def _is_channel_vector(t: TensorType, width: int) -> bool:
    return t.rank >= 1 and t.shape[-1] == width and all(d == 1 for d in t.shape[:-1])


def _last_axis(t: TensorType) -> object:
    return t.shape[-1] if t.rank else None


class _BlockFinder:
    """Walks back from L2's input; :meth:`find` returns the block or raises :class:`_NoBlock`."""

    def __init__(self, module: Module, fn: Function, linear: list[LinearLayer], readers: dict):
        self.module, self.fn, self.readers = module, fn, readers
        self.nodes = fn.node_map()
        self.users = fn.users()
        self.linear = {l.node: l for l in linear if l.function == fn.name}
        self.saw_elementwise = False

    def find(self, down: LinearLayer) -> FfnBlock:
        block, todo, seen = FfnBlock(down), [down.input], set()
        self.saw_elementwise = False
        while todo:
            value = todo.pop()
            if value not in seen:
                seen.add(value)
                todo.extend(self._visit(block, value))
        if not block.ups:
            raise _NoBlock("no linear layer feeds its input")
        self._check_private(block)
        return block

    def _visit(self, block: FfnBlock, value: str) -> list[str]:
        node = self.nodes.get(value)
        if node is None:
            raise _NoBlock(f"%{value} is a function input")
        up = self.linear.get(value)
        if up is not None and up.n == block.width:
            block.ups.append(up)
            return []
        if _last_axis(node.type) != block.width:
            raise _NoBlock(f"%{value} ({node.op.name}) does not have {block.width} channels on its last axis")
        if node.op.category is OpCategory.ELEMENTWISE:
            self.saw_elementwise = True
        elif not (node.op is ops.RESHAPE and _last_axis(self._type(node.inputs[0])) == block.width):
            raise _NoBlock(f"%{value} ({node.op.name}) is not channel-wise")
        block.chain[value] = node
        return [ref for ref in node.inputs if not self._is_leaf(block, ref)]

    def _type(self, ref: str) -> TensorType:
        return self.module.weights[ref[1:]].type if ref.startswith("@") else self.nodes[ref].type

    def _is_leaf(self, block: FfnBlock, ref: str) -> bool:
        """Scalars stay as they are, per-channel weights get sliced; other values are walked."""
        if ref.startswith("@"):
            t = self._type(ref)
            if _is_scalar(t):
                return True
            if _is_channel_vector(t, block.width):
                block.channel_weights.add(ref[1:])
                return True
            raise _NoBlock(f"weight {ref} {list(t.shape)} is neither a scalar nor one value per channel")
        node = self.nodes.get(ref)
        return node is not None and node.op is ops.CONSTANT and _is_scalar(node.type)

    def _check_private(self, block: FfnBlock) -> None:
        """Chain values feed only the chain (and L2); block weights are read only by the block."""
        inside = block.nodes()
        for value in set(block.chain) | {u.node for u in block.ups}:
            if value in self.fn.outputs:
                raise _NoBlock(f"%{value} is a function output")
            outside = [u.name for u in self.users.get(value, []) if u.name not in inside]
            if outside:
                raise _NoBlock(f"%{value} is also used by %{outside[0]}")
        for weight in block.weights():
            elsewhere = self.readers.get(weight, set()) - {(self.fn.name, n) for n in inside}
            if elsewhere:
                raise _NoBlock(f"weight {weight} is also read by %{sorted(elsewhere)[0][1]}")


def find_blocks(module: Module, recipe, linear: list[LinearLayer]):
    """(block, settings) for every L2 the recipe selects and that heads an FFN block, plus skip rows
    for selected L2s whose input is computed channel-wise but breaks a condition."""
    readers: dict[str, set] = {}
    for fn in module.functions.values():
        for node in fn.nodes:
            for ref in node.inputs:
                if ref.startswith("@"):
                    readers.setdefault(ref[1:], set()).add((fn.name, node.name))
    found, skipped = [], []
    for fn in module.entries:
        finder = _BlockFinder(module, fn, linear, readers)
        for down in (l for l in linear if l.function == fn.name):
            settings = recipe.settings_for("structured", down.name)
            if settings is None:
                continue
            try:
                found.append((finder.find(down), settings))
            except _NoBlock as why:
                if finder.saw_elementwise:
                    skipped.append(skip_row(down, str(why)))
    return found, skipped


def kept_width(width: int, settings: StructuredSettings) -> int:
    """``F - round(ratio * F)`` rounded up to a multiple of ``settings.multiple`` (at least one)."""
    multiple = max(1, int(settings.multiple))
    keep = width - math.floor(settings.ffn_ratio * width + 0.5)
    return max(multiple, -(-keep // multiple) * multiple)


# ----------------------------------------------------------------------------- the pass
class StructuredPrunePass:
    """Remove the least important FFN neurons / hidden channels (whole rows and columns of the
    weights around a channel-wise block) per the recipe."""

    def __init__(self, context: CompressionContext):
        self.context = context

    def __call__(self, module: Module) -> PassResult:
        linear = find_linear_layers(module)
        found, skipped = find_blocks(module, self.context.recipe, linear)
        plans = []
        for block, settings in found:
            keep = kept_width(block.width, settings)
            if keep < block.width:
                plans.append((block, keep))
            else:
                skipped.append(skip_row(block.down, f"keeping a multiple of {settings.multiple} leaves all "
                                                    f"{block.width} neurons at ratio {settings.ffn_ratio}"))
        if not plans:
            return PassResult(module, False, summarize([], skipped=skipped))
        stats = self.context.optional_stats(module, {b.down.input for b, _ in plans})
        weights, rows = dict(module.weights), []
        functions = dict(module.functions)
        for fn in module.entries:
            mine = [(b, k) for b, k in plans if b.down.function == fn.name]
            if mine:
                functions[fn.name], fn_rows = _rebuild(module, fn, mine, stats, weights)
                rows.extend(fn_rows)
        for block, _ in plans:
            for name in block.weights():
                del weights[name]
        return PassResult(Module(functions, weights, module.metadata), True, summarize(rows, skipped=skipped))


def _choose(module: Module, block: FfnBlock, keep: int, stats, weights: dict) -> tuple[dict, dict]:
    """Pick the neurons to keep and store the sliced weights; returns ({old "@W": new "@W.pruned"},
    the report row)."""
    arrays = {name: np.asarray(module.weights[name].array) for name in block.weights()}
    w2 = arrays[block.down.weight]
    h_stats = stats.get(block.down.input)
    act = h_stats.sq_mean if h_stats is not None else None
    score = neuron_importance([arrays[u.weight] for u in block.ups], w2, act)
    kept = np.sort(np.argsort(-score, kind="stable")[:keep])
    sliced = {u.weight: arrays[u.weight][:, kept] for u in block.ups}
    sliced[block.down.weight] = w2[kept, :]
    sliced.update((name, arrays[name][..., kept]) for name in block.channel_weights)
    rename = {f"@{name}": add_weight(weights, f"{name}.pruned", np.ascontiguousarray(a)) for name, a in sliced.items()}
    sqnr = None
    if h_stats is not None and len(h_stats.sample):
        mask = np.zeros(block.width, dtype=bool)
        mask[kept] = True
        sqnr = output_sqnr_db(h_stats.sample, w2, np.where(mask[:, None], w2, 0.0))
    before = sum(a.size for a in arrays.values())
    after = sum(a.size for a in sliced.values())
    row = layer_row(block.down, "ffn-neurons", after, sqnr, neurons_before=block.width, neurons_after=keep,
                    importance="activation" if act is not None else "weight-norm",
                    inputs=[u.name for u in block.ups])
    row["params_before"] = before
    return rename, row


def _rebuild(module: Module, fn: Function, plans, stats, weights: dict) -> tuple[Function, list[dict]]:
    """Re-emit ``fn`` with every block's nodes reading the sliced weights (types re-inferred);
    returns the function and one report row per block."""
    rename, widths, rows = {}, {}, []
    for block, keep in plans:
        block_rename, row = _choose(module, block, keep, stats, weights)
        rename.update(block_rename)
        rows.append(row)
        widths.update((name, keep) for name in block.nodes())
    rw = Rewriter(module, fn, weights)
    for node in fn.nodes:
        if node.name not in widths:
            rw.keep(node)
            continue
        attrs = dict(node.attrs.items())
        if node.op is ops.RESHAPE:
            attrs["shape"] = (*attrs["shape"][:-1], widths[node.name])
        new = rw.add(node.op, [rename.get(i, rw.ref(i)) for i in node.inputs], attrs, name=node.name)
        if new != node.name:
            rw.replace(node, new)
    return rw.finish(), rows


def structured_pass(context: CompressionContext) -> PassInfo:
    return PassInfo("structured", StructuredPrunePass(context), StructuredPrunePass.__doc__, lossy=True)
