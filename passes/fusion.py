"""Operator fusion: partition each entry function into groups that the backend emits as ONE kernel.

A group has at most one *anchor* (an op that reduces) and a single escaping value, its *root*:
every other member is used only inside the group and is not a function output. That makes
groups convex (no path leaves a group and comes back), so calling each group at the position of
its root keeps the entry topologically ordered. Groups are built greedily in four phases:

1. **Anchors**, in program order. A CONTRACTION (matmul, conv2d) takes a *prologue*: producers of
   its operands that are elementwise ops, transpose, reshape, broadcast_to, slice, concat, dequantize or
   dynamic_quantize, used only inside the group (recursively). A product of an activation and a weight
   takes only prologue ops of one computed input: its kernels read the activation once per k, and a
   join such as ``silu(g) * u`` would be recomputed by every block of outputs. A REDUCTION or
   NORMALIZATION anchor (sum/mean/max/..., softmax, layer_norm, rms_norm, pooling) takes an
   elementwise-only prologue (the scale and mask add before softmax).
   Then both take an *epilogue*: while the root has a single user that is elementwise and
   unclaimed, it joins and becomes the root (bias add, activation, residual add; ``silu(x@Wg) *
   (x@Wu)`` joins the gate matmul's group, taking the other matmul's result as an input). Scans
   (cumsum) are never fused: TVM lowers them with its own scan kernels, which cannot be merged
   into one TIR function when a dim is symbolic.
2. **Injective chains**: remaining elementwise/layout ops, visited in reverse program order, join
   the group of their users when all users are in one anchor-free group; otherwise they start one.
3. **Recomputation**: an injective group whose value is read only inside other groups, each of
   which can compute it, is copied into every reader and dropped, visiting the last groups first.
   A reader can compute it when it is an injective group, or a contraction reading it in its
   prologue and reading each of those operand elements once (``A [.., M, K] @ B [.., K, N]`` reads
   A's elements N times, B's M times; a copy would recompute them as often). In a one-token step the
   attention's ``reshape -> transpose`` of q, read both by the rotary ``slice -> neg -> concat`` and
   by the score product, becomes part of the score product's operand reads instead of two kernels
   that write and re-read q: a kernel launch and a round trip through memory saved. With a prompt of
   T tokens each q element is read T times, and the views stay kernels of their own. A reduction's
   elementwise epilogue absorbs a group it reads whole, each element once: attending over one key,
   ``softmax(scores) * v`` computes the views that give v its heads' layout itself.
4. **Outlining** (:mod:`slimgraph.passes.fusion_outline`): each group becomes a FUSED function
   whose params are the group's external inputs (weights are passed as call arguments), called
   from the entry by a ``call`` node that keeps the root's value name. Structurally identical
   groups share one function, so N identical transformer layers compile each kernel once.

What stays unfused in the entry: a lone reshape (a free view); source ops (``constant``,
``arange``) -- static ones are cloned into every group that reads them, symbolic ones stay in the
entry since a fused function could not know their size; cache ops (``kv_cache_write``, which writes
the cache in place, and ``cache_attention``); groups whose types mention a symbolic dim
that none of their inputs carries (the function could not bind it); existing calls and impure ops.
Every other group -- even of one op -- becomes a function, so the entry is calls plus free views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimgraph.compiler import ops
from slimgraph.compiler.ir import Function, FunctionKind, Module, Node
from slimgraph.compiler.ops import OpCategory
from slimgraph.compiler.passmanager import PassResult, register_pass
from slimgraph.passes.fusion_outline import is_static_source

ANCHOR_CATEGORIES = (OpCategory.CONTRACTION, OpCategory.REDUCTION, OpCategory.NORMALIZATION)
SCANS = frozenset({ops.CUMSUM})
UNFUSED = (OpCategory.SOURCE, OpCategory.CALL, OpCategory.CACHE)  # cache ops run in place, alone
INJECTIVE = (OpCategory.ELEMENTWISE, OpCategory.LAYOUT)
CONTRACTION_PROLOGUE_LAYOUT = frozenset({ops.TRANSPOSE, ops.RESHAPE, ops.BROADCAST_TO, ops.SLICE, ops.CONCAT,
                                         ops.DEQUANTIZE, ops.DYNAMIC_QUANTIZE})


@dataclass
class Group:
    """Nodes fused into one kernel; ``anchor`` is None for injective-only groups."""

    anchor: Node | None
    root: str
    members: set = field(default_factory=set)


def prologue_allows(anchor: Node, node: Node) -> bool:
    """Whether ``node`` may be computed inside ``anchor``'s kernel while reading its operand."""
    if node.op.category is OpCategory.ELEMENTWISE:
        return True
    return anchor.op.category is OpCategory.CONTRACTION and node.op in CONTRACTION_PROLOGUE_LAYOUT


class Partitioner:
    """Assigns the nodes of one entry function to groups (see the module docstring)."""

    def __init__(self, fn: Function):
        self.fn = fn
        self.nodes = fn.node_map()
        self.users = {name: {u.name for u in us} for name, us in fn.users().items()}
        self.outputs = set(fn.outputs)
        self.group_of: dict[str, Group] = {}
        self.types = {p.name: p.type for p in fn.params}
        self.types.update((n.name, n.type) for n in fn.nodes)
        self.order = {n.name: i for i, n in enumerate(fn.nodes)}   # program position

    def fusible(self, node: Node | None) -> bool:
        return (node is not None and node.name not in self.group_of and node.op.pure
                and node.op.category not in UNFUSED and node.op not in SCANS)

    def internal(self, name: str, members: set) -> bool:
        """``name`` is used only by ``members`` and is not a function output."""
        return name not in self.outputs and self.users.get(name, set()) <= members

    def claim(self, group: Group, node: Node) -> None:
        group.members.add(node.name)
        self.group_of[node.name] = group

    def computed_inputs(self, node: Node) -> int:
        """Inputs computed from activations: not static sources, not weights or views of weights."""
        return sum(1 for ref in node.inputs
                   if ref in self.types and not is_static_source(self.nodes.get(ref)) and not self.from_weights(ref))

    def from_weights(self, ref: str) -> bool:
        """``ref`` is a weight, or a layout view / dequantize of weights (column panels, packed codes)."""
        if ref.startswith("@"):
            return True
        node = self.nodes.get(ref)
        return (node is not None and node.op.category is OpCategory.LAYOUT
                and all(self.from_weights(i) for i in node.inputs))

    def weight_product(self, anchor: Node) -> bool:
        """A product of an activation and a weight (or a view or dequantize of weights)."""
        return anchor.op is ops.MATMUL and self.from_weights(anchor.inputs[1])

    def takes_into_prologue(self, anchor: Node, node: Node) -> bool:
        """``prologue_allows``, and: a weight product's kernels read the activation once per k (a
        one-token product streams the weight past every k), so its prologue takes only ops of one
        computed input -- ``silu(g) * u`` is computed once, not by every block of outputs."""
        if not prologue_allows(anchor, node):
            return False
        return not self.weight_product(anchor) or self.computed_inputs(node) <= 1

    def grow_prologue(self, group: Group) -> None:
        grown = True
        while grown:
            grown = False
            for member in sorted(group.members):
                for ref in self.nodes[member].inputs:
                    p = self.nodes.get(ref)
                    if (self.fusible(p) and self.takes_into_prologue(group.anchor, p)
                            and self.internal(p.name, group.members)):
                        self.claim(group, p)
                        grown = True

    def grow_epilogue(self, group: Group) -> None:
        while group.root not in self.outputs and len(self.users.get(group.root, ())) == 1:
            user = self.nodes[next(iter(self.users[group.root]))]
            if not self.fusible(user) or user.op.category is not OpCategory.ELEMENTWISE:
                return
            self.claim(group, user)
            group.root = user.name

    def anchors(self) -> None:
        for node in self.fn.nodes:
            if not self.fusible(node) or node.op.category not in ANCHOR_CATEGORIES:
                continue
            group = Group(node, node.name)
            self.claim(group, node)
            self.grow_prologue(group)
            self.grow_epilogue(group)

    def injective(self) -> None:
        for node in reversed(self.fn.nodes):
            if not self.fusible(node) or node.op.category not in INJECTIVE:
                continue
            users = self.users.get(node.name, set())
            targets = {id(self.group_of[u]): self.group_of[u] for u in users if u in self.group_of}
            if (node.name not in self.outputs and users and len(targets) == 1
                    and all(u in self.group_of for u in users)):
                target = next(iter(targets.values()))
                if target.anchor is None:
                    self.claim(target, node)
                    continue
            self.claim(Group(None, node.name), node)

    def upstream(self, start: str, members: set) -> set:
        """``start`` and every value read from it through ``members`` (the inputs of a member are
        followed, those of a non-member are not)."""
        todo, seen = [start], {start}
        while todo:
            name = todo.pop()
            if name in members:
                fresh = [ref for ref in self.nodes[name].inputs if ref not in seen]
                seen.update(fresh)
                todo.extend(fresh)
        return seen

    def prologue_of(self, group: Group) -> set:
        """The anchor of ``group`` and the members it reads, directly or through other members."""
        return self.upstream(group.anchor.name, group.members) & group.members

    def can_absorb(self, target: Group, group: Group) -> bool:
        """Whether ``target`` can compute the injective ``group`` itself: as part of an injective
        kernel, of a contraction's prologue (the reads of its operands), or of the elementwise
        epilogue of a reduction that reads each of its elements once."""
        if target.anchor is None:
            return True
        readers = self.users[group.root] & target.members
        if target.anchor.op.category is not OpCategory.CONTRACTION:
            return not readers & self.prologue_of(target) and self.read_whole(readers, group.root)
        if not all(self.takes_into_prologue(target.anchor, self.nodes[m]) for m in group.members):
            return False
        return readers <= self.prologue_of(target) and self.read_once(target, group.root)

    def read_whole(self, readers: set, root: str) -> bool:
        """Whether each elementwise reader of ``root`` has ``root``'s shape (reads each element once,
        where a broadcast operand would be read, and a copy recomputed, many times)."""
        shape = self.nodes[root].type.shape
        return all(self.nodes[r].op.category is OpCategory.ELEMENTWISE and self.nodes[r].type.shape == shape
                   for r in readers)

    def read_once(self, target: Group, root: str) -> bool:
        """Whether the contraction of ``target`` reads each element of the operands that ``root``
        feeds once: ``A [.., M, K] @ B [.., K, N]`` reads A's elements N times and B's M times, so a
        copy in its prologue would be recomputed that often (a one-token score product: once)."""
        anchor = target.anchor
        shape = anchor.type.shape
        if anchor.op is not ops.MATMUL or len(shape) < 2:
            return False
        reads = {0: shape[-1], 1: shape[-2]}
        return all(reads[i] == 1 for i, ref in enumerate(anchor.inputs)
                   if root in self.upstream(ref, target.members))

    def recompute(self) -> None:
        """Injective groups whose value is read only inside other groups, each able to absorb it,
        are computed inside each reader instead of as kernels of their own (last first, so chains
        of such groups dissolve into the same readers)."""
        live = self.distinct_groups()
        for group in sorted((g for g in live if g.anchor is None), key=lambda g: -self.order[g.root]):
            users = self.users.get(group.root, set())
            if group.root in self.outputs or not users or not users <= self.group_of.keys():
                continue
            targets = [t for t in live if t is not group and t.members & users]   # copies read it too
            if any(group.root in t.members or not self.can_absorb(t, group) for t in targets):
                continue
            for target in targets:
                target.members |= group.members
            for member in group.members:
                self.group_of[member] = targets[0]
            live.remove(group)

    def groups(self) -> list[Group]:
        """The groups worth outlining, ordered by the position of their root."""
        self.anchors()
        self.injective()
        self.recompute()
        kept = [g for g in self.distinct_groups() if self.worth_outlining(g)]
        return sorted(kept, key=lambda g: self.order[g.root])

    def distinct_groups(self) -> list[Group]:
        return list({id(g): g for g in self.group_of.values()}.values())

    def worth_outlining(self, group: Group) -> bool:
        if len(group.members) == 1 and self.nodes[group.root].op is ops.RESHAPE:
            return False
        inner: set[str] = set()
        outer: set[str] = set()
        for name in group.members:
            node = self.nodes[name]
            inner |= node.type.symbols()
            for ref in node.inputs:
                if ref not in group.members and ref in self.types:
                    outer |= self.types[ref].symbols()
        return inner <= outer


@register_pass("fuse")
def fuse(module: Module) -> PassResult:
    """Group each entry's ops into single-kernel fused functions, shared between identical groups."""
    from slimgraph.passes.fusion_outline import Outliner

    outliner = Outliner(module)
    functions: dict[str, Function] = {}
    for name, fn in module.functions.items():
        if fn.kind is FunctionKind.ENTRY:
            functions[name] = outliner.outline(fn, Partitioner(fn).groups())
        else:
            functions[name] = fn
    functions.update(outliner.created)
    stats = outliner.stats
    if not stats["calls"]:
        return PassResult(module, False, stats)
    return PassResult(Module(functions, module.weights, module.metadata), True, stats)
