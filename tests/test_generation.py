"""Generation builds: prefill + decode over a device-resident KV cache.

Greedy tokens must equal transformers' own greedy generation (its KV cache, its attention), first
through the IR interpreter (the frontend's graph), then through compiled x86 artifacts; the
caches must be written in place; every bad input names what is wrong.
"""

import json

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.compiler import ops
from slimgraph.compiler.cli import main as cli_main
from slimgraph.compiler.driver import CompileOptions, compile_model, load_model, optimize
from slimgraph.compiler.errors import GenerationError, SamplingOptionError, UnsupportedError, UsageError
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.kv_cache import GENERATION_METADATA, CacheLayout
from slimgraph.compiler.recipe import recipe_from_flags
from slimgraph.compiler.types import DType
from slimgraph.models import testmodels

pytest.importorskip("tvm")

CONTEXT = 40
PROMPT = [5, 17, 99, 3, 42, 7]


def hf_greedy(name: str, prompt: list[int], new_tokens: int) -> list[int]:
    model = testmodels.TINY_HF_MODELS[name]()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def interpreter_greedy(module, prompt: list[int], new_tokens: int) -> list[int]:
    """The generation loop run on the IR with numpy arrays: the reference for compiled builds."""
    layout = CacheLayout.from_json(module.metadata[GENERATION_METADATA])
    caches = [np.zeros(layout.shape, DType(layout.dtype).numpy) for _ in range(2 * layout.layers)]
    logits, *caches = run(module, [np.array([prompt]), *caches], function="prefill")
    tokens, length = [], len(prompt)
    for _ in range(new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        length += 1
        step = [np.array([[tokens[-1]]]), np.array([[length - 1]]), np.ones((1, length), np.int64)]
        logits, *caches = run(module, [*step, *caches], function="decode")
    return tokens


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    built = {}
    for name in ("tiny-llama", "tiny-gpt"):
        compile_model(name, root / name, CompileOptions(kv_cache=CONTEXT))
        built[name] = root / name
    return built


# ----------------------------------------------------------------------------- the traced graph
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt"])
def test_traced_prefill_and_decode_match_transformers_greedy(name):
    module, _ = load_model(name, max_context=CONTEXT)
    assert {"prefill", "decode"} <= set(module.functions)
    decode = module.functions["decode"]
    assert [p.name for p in decode.params[:3]] == ["input_ids", "position_ids", "attention_mask"]
    assert sum(n.op is ops.CACHE_ATTENTION for n in decode.nodes) == 2       # one per layer
    assert sum(n.op is ops.KV_CACHE_WRITE for n in decode.nodes) == 4        # key and value per layer
    assert decode.output_types()[0].shape == (1, 1, 256)                    # last-position logits only
    assert interpreter_greedy(module, PROMPT, 12) == hf_greedy(name, PROMPT, 12)


def test_cache_ops_stay_out_of_fusion_groups():
    module, _ = load_model("tiny-llama", max_context=CONTEXT)
    fused = optimize(module, CompileOptions(kv_cache=CONTEXT)).module
    for fn in fused.functions.values():
        kinds = {n.op for n in fn.nodes}
        if fn.kind.value == "fused":
            assert not kinds & {ops.KV_CACHE_WRITE, ops.CACHE_ATTENTION}, fn.name
    decode = fused.functions["decode"]
    assert sum(n.op is ops.KV_CACHE_WRITE for n in decode.nodes) == 4


def test_half_precision_stores_the_caches_in_float16():
    module, _ = load_model("tiny-llama", max_context=CONTEXT)
    half = optimize(module, CompileOptions(kv_cache=CONTEXT, passes=("fold_constants", "dce", "half_precision"))).module
    decode = half.functions["decode"]
    caches = [p for p in decode.params if p.name.startswith("past.")]
    assert caches and all(p.type.dtype.value == "f16" for p in caches)
    assert all(t.dtype.value == "f16" for t in decode.output_types()[1:])
    assert decode.output_types()[0].dtype.value == "f32"
    assert CacheLayout.from_json(half.metadata[GENERATION_METADATA]).dtype == "f16"


# ----------------------------------------------------------------------------- compiled artifacts
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt"])
def test_compiled_greedy_generation_matches_transformers(name, artifacts):
    model = slimgraph.load(artifacts[name])
    result = model.generate(PROMPT, max_new_tokens=24, stop_tokens=())
    assert result.token_ids == hf_greedy(name, PROMPT, 24)
    stats = result.stats
    assert stats.prompt_tokens == len(PROMPT) and stats.new_tokens == 24 and stats.decode_steps == 23
    assert 0 < stats.prefill_seconds <= stats.first_token_seconds and stats.decode_tokens_per_second > 0


def test_decode_writes_the_caches_in_place(artifacts):
    model = slimgraph.load(artifacts["tiny-llama"])
    gen = model.generator
    before = [c.data_ptr() for c in gen.caches]
    gen.prefill(PROMPT)
    key0 = gen.caches[0].numpy()
    assert np.abs(key0[:, :, :len(PROMPT)]).max() > 0 and not key0[:, :, len(PROMPT):].any()
    result = model.vm["decode"](gen._token, gen._position, gen._mask._create_view((1, len(PROMPT) + 1)),
                                *gen.caches, *gen._decode._weights)
    presents = list(result)[1:]
    assert [p.data_ptr() for p in presents] == before                    # the outputs are our caches
    assert [c.data_ptr() for c in gen.caches] == before


@pytest.mark.parametrize("activations,zero_point", [(None, "integer"), ("int8", "integer"), ("int8", "float")])
def test_quantized_generation_matches_the_interpreter(tmp_path, activations, zero_point):
    """int4 weights, with float inputs to the products or 8-bit ones (the integer kernels on CPUs
    with VNNI, where decode's one-row products multiply codes by codes), with integer zero points
    or float ones (each group's grid starting at its minimum)."""
    (tmp_path / "recipe.toml").write_text(f'[quantize]\nzero_point = "{zero_point}"\n')
    recipe = recipe_from_flags(recipe_file=tmp_path / "recipe.toml", quantize="int4", group_size=32,
                               activations=activations)
    options = CompileOptions(kv_cache=CONTEXT, recipe=recipe)
    compile_model("tiny-llama", tmp_path / "q4", options)
    module, _ = load_model("tiny-llama", max_context=CONTEXT)
    reference = optimize(module, options).module
    model = slimgraph.load(tmp_path / "q4")
    assert model.generate(PROMPT, max_new_tokens=12, stop_tokens=()).token_ids == interpreter_greedy(reference, PROMPT, 12)


def test_sampling_is_seeded_and_stops_at_stop_tokens(artifacts):
    model = slimgraph.load(artifacts["tiny-gpt"])
    draw = dict(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_new_tokens=16, stop_tokens=())
    first, again = model.generate(PROMPT, **draw).token_ids, model.generate(PROMPT, **draw).token_ids
    assert first == again and len(first) == 16
    other = model.generate(PROMPT, **dict(draw, seed=8)).token_ids
    assert other != first
    stop = first[3]
    cut = model.generate(PROMPT, **dict(draw, stop_tokens=(stop,))).token_ids
    assert cut == first[:first.index(stop) + 1]


def test_generate_cli_streams_ids_and_reports_timings(artifacts, capsys):
    ids = ",".join(map(str, PROMPT))
    assert cli_main(["generate", str(artifacts["tiny-llama"]), "--prompt-ids", ids, "--max-new-tokens", "8",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["token_ids"] == hf_greedy("tiny-llama", PROMPT, 8)
    assert doc["stats"]["decode_steps"] == 7 and doc["stats"]["decode_tokens_per_second"] > 0
    assert cli_main(["generate", str(artifacts["tiny-llama"]), "--prompt-ids", ids, "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(t) for t in doc["token_ids"][:4]]
    assert "prefill" in captured.err and "tokens/s" in captured.err


# ----------------------------------------------------------------------------- bad input
def test_prompts_beyond_the_context_are_refused(artifacts):
    model = slimgraph.load(artifacts["tiny-llama"])
    with pytest.raises(GenerationError, match="compiled context of 40"):
        model.generate(list(range(30)), max_new_tokens=20)
    with pytest.raises(GenerationError, match="does not fit the compiled context"):
        model.generator.prefill(list(range(CONTEXT)))
    with pytest.raises(SamplingOptionError, match="top_p"):
        model.generate(PROMPT, top_p=0.0)


def test_text_prompts_need_the_tokenizer(artifacts):
    model = slimgraph.load(artifacts["tiny-llama"])
    with pytest.raises(GenerationError, match="holds no tokenizer"):
        model.generate("hello")
    assert cli_main(["generate", str(artifacts["tiny-llama"]), "--prompt", "hello"]) == GenerationError.exit_code
    assert cli_main(["generate", str(artifacts["tiny-llama"])]) == UsageError.exit_code
    assert cli_main(["generate", str(artifacts["tiny-llama"]), "--prompt-ids", "1,x"]) == UsageError.exit_code
    assert cli_main(["generate", str(artifacts["tiny-llama"]), "--prompt-ids", "1,999"]) == UsageError.exit_code


def test_artifacts_without_generation_entries_are_refused(tmp_path):
    compile_model("tiny-llama", tmp_path / "plain", CompileOptions())
    with pytest.raises(GenerationError, match="not compiled for generation"):
        slimgraph.load(tmp_path / "plain").generate(PROMPT)


@pytest.mark.parametrize("model, options, error, message", [
    ("tiny-bert", {}, UnsupportedError, "not a causal LM"),
    ("mlp", {}, UnsupportedError, "needs a Hugging Face causal LM"),
    ("tiny-llama", {"shapes": {"input_ids": (1, 8)}}, UsageError, "--shape cannot be combined"),
    ("tiny-llama", {"kv_cache": 1}, UsageError, "at least 2 positions"),
    ("tiny-llama", {"kv_cache": 100_000}, UnsupportedError, "exceeds the model's"),
])
def test_bad_generation_builds_are_refused(model, options, error, message, tmp_path):
    options = {"kv_cache": CONTEXT, **options}
    with pytest.raises(error, match=message):
        compile_model(model, tmp_path / "out", CompileOptions(**options))


# ----------------------------------------------------------------------------- the packaged LLM
SMOLLM2_PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):",
                   "The three primary colors are", "Water boils at a temperature of"]


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(tmp_path, capsys):
    from slimgraph.compiler.frontends.huggingface import load_hf_model
    from slimgraph.models.registry import resolve_model

    compile_model("smollm2", tmp_path / "smollm2", CompileOptions(kv_cache=256))
    model = slimgraph.load(tmp_path / "smollm2")
    tokenizer = model.generator.tokenizer
    reference = load_hf_model(resolve_model("smollm2").path)
    for prompt in SMOLLM2_PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ours = model.generate(ids, max_new_tokens=64).token_ids           # stops at EOS, as transformers does
        hf_ids = torch.tensor([ids])
        theirs = reference.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=64,
                                    do_sample=False)[0, len(ids):].tolist()
        assert ours == theirs, prompt
    assert cli_main(["generate", str(tmp_path / "smollm2"), "--prompt", "What is the capital of France?",
                     "--max-new-tokens", "16", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prompt_ids"][:3] == tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                                   add_generation_prompt=True)[:3]
    assert "Paris" in doc["text"]
