"""Causal LMs for generation: one module with a ``prefill`` and a ``decode`` entry sharing a KV cache.

Both entries are traced from the transformers model itself (torch.export), with its attention
function swapped, while tracing, for one that writes the step's keys and values into the cache:

* ``prefill(input_ids: i64[1,T], past.N.key, past.N.value ...)`` runs the prompt from an empty
  cache: attention is the model's own causal attention over the prompt, and the prompt's keys and
  values are written to cache rows ``[0, T)`` (``kv_cache_write``);
* ``decode(input_ids: i64[1,1], position_ids: i64[1,1], attention_mask: i64[1,L], past...)``
  writes the new token's key and value to row ``L - 1`` and attends over the first ``L`` cache
  rows (``cache_attention``); ``L`` is the attention mask's length (transformers' convention).

Each cache is ``[1, kv_heads, max_context, head_dim]``, allocated once by the runtime. Both entries
return ``logits`` of the last position only (``[1, 1, vocab]``, transformers' ``logits_to_keep=1``)
followed by the updated caches ``present.N.key/value``, which the backend writes in place: they
are the very tensors passed in.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from slimgraph.compiler import ops
from slimgraph.compiler.errors import UnsupportedError
from slimgraph.compiler.frontends.torch_context import converts
from slimgraph.compiler.ir import Function, Module
from slimgraph.compiler.kv_cache import GENERATION_METADATA, CacheLayout

ATTENTION_NAME = "slimgraph_kv_cache"
EXAMPLE_LENGTH = 8


# ----------------------------------------------------------------------------- torch custom ops
@torch.library.custom_op("slimgraph::kv_cache_write", mutates_args=())
def kv_cache_write(cache: torch.Tensor, new: torch.Tensor, end: int) -> torch.Tensor:
    """The cache with rows ``[end - T, end)`` replaced by ``new`` (T = new.shape[2])."""
    out = cache.clone()
    out[:, :, end - new.shape[2]:end] = new
    return out


@kv_cache_write.register_fake
def _(cache, new, end):
    return torch.empty_like(cache)


@torch.library.custom_op("slimgraph::cache_attention", mutates_args=())
def cache_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    attention_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``query`` over the first ``attention_mask.shape[1]`` cache rows (see ops.cache)."""
    t, length = query.shape[2], attention_mask.shape[1]
    rep = query.shape[1] // k_cache.shape[1]
    keys = k_cache[:, :, :length].repeat_interleave(rep, dim=1)
    values = v_cache[:, :, :length].repeat_interleave(rep, dim=1)
    scores = query @ keys.transpose(-1, -2) * scale
    position = torch.arange(length - t, length)[:, None]
    keep = (torch.arange(length)[None, :] <= position) & (attention_mask[:, None, None, :] != 0)
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ values


@cache_attention.register_fake
def _(query, k_cache, v_cache, attention_mask, scale):
    return torch.empty_like(query)


@converts(torch.ops.slimgraph.kv_cache_write.default)
def _convert_write(ctx, a):
    return ctx.add(ops.KV_CACHE_WRITE, [ctx.tensor(a["cache"]), ctx.tensor(a["new"])], {"end": ctx.dim(a["end"])})


@converts(torch.ops.slimgraph.cache_attention.default)
def _convert_attention(ctx, a):
    inputs = [ctx.tensor(a[n]) for n in ("query", "k_cache", "v_cache", "attention_mask")]
    return ctx.add(ops.CACHE_ATTENTION, inputs, {"scale": float(a["scale"])})


# ----------------------------------------------------------------------------- tracing session
class _Session:
    """The caches of one traced call; ``mask`` is None in prefill (the cache starts empty)."""

    def __init__(self, caches, end, mask):
        self.caches, self.end, self.mask = caches, end, mask
        self.updated: dict[int, tuple] = {}
        self.key_shapes: dict[int, tuple] = {}


_SESSIONS: list[_Session] = []


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function used while tracing (registered as ``slimgraph_kv_cache``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    session, layer = _SESSIONS[-1], module.layer_idx
    session.key_shapes[layer] = tuple(key.shape)
    if session.caches is None:               # probing the cache layout
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, **kwargs)
    k_cache, v_cache = session.caches[layer]
    k_cache = torch.ops.slimgraph.kv_cache_write(k_cache, key, session.end)
    v_cache = torch.ops.slimgraph.kv_cache_write(v_cache, value, session.end)
    session.updated[layer] = (k_cache, v_cache)
    if session.mask is None:
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, **kwargs)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.slimgraph.cache_attention(query, k_cache, v_cache, session.mask, scale)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """The mask builder for ``slimgraph_kv_cache``: masking happens inside the attention above."""
    return None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


@contextlib.contextmanager
def _cache_attention(model, session: _Session):
    """Run ``model`` with the cache-writing attention, restoring its own afterwards."""
    _register_attention()
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    saved = [c._attn_implementation for c in configs]
    _SESSIONS.append(session)
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        yield session
    finally:
        _SESSIONS.pop()
        for c, s in zip(configs, saved):
            c._attn_implementation = s


# ----------------------------------------------------------------------------- wrappers
class _StepWrapper(torch.nn.Module):
    """Base of the prefill/decode wrappers: the model's children under their own names."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        object.__setattr__(self, "hf_model", model)
        for name, child in model.named_children():
            self.add_module(name, child)
        self.layers = layers

    def _run(self, input_ids, caches, end, mask, position_ids=None):
        pairs = [(caches[2 * i], caches[2 * i + 1]) for i in range(self.layers)]
        with _cache_attention(self.hf_model, _Session(pairs, end, mask)) as session:
            out = self.hf_model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                logits_to_keep=1, return_dict=True)
        present = [t for i in range(self.layers) for t in session.updated[i]]
        return (out.logits, *present)


class PrefillWrapper(_StepWrapper):
    def forward(self, input_ids, *caches):
        return self._run(input_ids, caches, input_ids.shape[1], None)


class DecodeWrapper(_StepWrapper):
    def forward(self, input_ids, position_ids, attention_mask, *caches):
        return self._run(input_ids, caches, attention_mask.shape[1], attention_mask, position_ids)


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def probe_layout(model: torch.nn.Module, max_context: int) -> CacheLayout:
    """Run the model once on a few tokens and read each layer's key shape [B, kv_heads, T, head_dim]."""
    session = _Session(None, None, None)
    with torch.no_grad(), _cache_attention(model, session):
        model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=False, return_dict=True)
    if not session.key_shapes:
        raise UnsupportedError(f"{type(model).__name__}: its attention does not use transformers' attention "
                               "interface, so no key/value cache can be attached")
    shapes = {s[1:4:2] for s in session.key_shapes.values()}
    if len(shapes) != 1:
        raise UnsupportedError(f"{type(model).__name__}: layers differ in key shape {sorted(shapes)}")
    (kv_heads, head_dim), = shapes
    return CacheLayout(len(session.key_shapes), kv_heads, head_dim, max_context, int(model.config.vocab_size))


def import_hf_generation(model: torch.nn.Module, *, source: str, max_context: int) -> Module:
    """Trace ``prefill`` and ``decode`` of a transformers causal LM into one module (see module docs)."""
    from slimgraph.compiler.frontends.torch_export import export_module, import_exported_program

    model = model.eval()
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and max_context > limit:
        raise UnsupportedError(f"{source}: --max-context {max_context} exceeds the model's {limit} positions")
    layout = probe_layout(model, max_context)
    caches = tuple(torch.zeros(1, layout.kv_heads, max_context, layout.head_dim) for _ in range(2 * layout.layers))
    past, present = cache_names(layout.layers, "past"), cache_names(layout.layers, "present")
    ids = torch.arange(EXAMPLE_LENGTH, dtype=torch.int64)[None] % layout.vocab
    length = torch.export.Dim("T", min=2, max=max_context)
    prefill = export_module(PrefillWrapper(model, layout.layers), (ids, *caches), source=source,
                            dynamic_shapes=({1: length}, (None,) * len(caches)))
    context = torch.export.Dim("L", min=2, max=max_context)
    decode = export_module(DecodeWrapper(model, layout.layers),
                           (ids[:, :1], torch.tensor([[EXAMPLE_LENGTH - 1]]),
                            torch.ones(1, EXAMPLE_LENGTH, dtype=torch.int64), *caches), source=source,
                           dynamic_shapes=(None, None, {1: context}, (None,) * len(caches)))
    outputs = ["logits", *present]
    functions, weights = {}, {}
    for name, program, inputs, dims in (
            ("prefill", prefill, ["input_ids", *past], {"input_ids": {1: "T"}}),
            ("decode", decode, ["input_ids", "position_ids", "attention_mask", *past], {"attention_mask": {1: "L"}})):
        imported = import_exported_program(program, source=source, input_names=inputs, dim_names=dims,
                                           output_names=outputs)
        functions[name] = _renamed(imported.main, name, outputs)
        weights.update(imported.weights)
    metadata = {"source": source, "frontend": "torch", "output_names": ",".join(outputs),
                GENERATION_METADATA: layout.to_json()}
    return Module(functions, weights, metadata)


def _renamed(fn: Function, name: str, outputs: list[str]) -> Function:
    """The entry ``fn`` as ``name`` with its outputs renamed ``logits, present.N.key, ...``
    (any other value already holding one of those names gets a ``_v`` suffix)."""
    taken = {p.name for p in fn.params} | {n.name for n in fn.nodes}
    mapping = {old: new for old, new in zip(fn.outputs, outputs)}
    for value in sorted(taken - set(mapping)):
        if value in outputs:
            mapping[value] = f"{value}_v"
    ref = lambda r: mapping.get(r, r)  # noqa: E731
    nodes = tuple(replace(n, name=ref(n.name), inputs=tuple(ref(i) for i in n.inputs)) for n in fn.nodes)
    params = tuple(replace(p, name=ref(p.name)) for p in fn.params)
    return replace(fn, name=name, params=params, nodes=nodes, outputs=tuple(ref(o) for o in fn.outputs))
