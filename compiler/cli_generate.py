"""``slimgraph generate``: stream text from an artifact compiled with ``--kv-cache``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slimgraph.compiler.errors import UsageError


def _prompt_tokens(generator, prompt: str | None, prompt_ids: str | None, chat: bool) -> list[int]:
    if (prompt is None) == (prompt_ids is None):
        raise UsageError("give exactly one of --prompt TEXT and --prompt-ids 1,2,3")
    if prompt is not None:
        return generator.encode(prompt, chat=chat)
    try:
        ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--prompt-ids {prompt_ids!r}: expected comma-separated integers") from None
    vocab = generator.layout.vocab
    bad = [i for i in ids if not 0 <= i < vocab]
    if not ids or bad:
        raise UsageError(f"--prompt-ids: {'no ids' if not ids else f'ids {bad[:5]} outside the vocabulary of {vocab}'}")
    return ids


def run_generate(*, artifact: Path, prompt, prompt_ids, chat: bool, sampling: dict, stop: list[int],
                 threads, as_json: bool) -> None:
    import slimgraph
    from slimgraph.backends.sampling import SamplingOptions

    model = slimgraph.load(artifact, threads=threads)
    generator = model.generator
    ids = _prompt_tokens(generator, prompt, prompt_ids, chat)
    options = SamplingOptions(**sampling, stop_tokens=tuple(stop) or generator.stop_tokens())
    tokenizer = generator.tokenizer
    if tokenizer is not None:
        pieces = generator.stream_text(ids, options)
    else:
        pieces = (f"{token} " for token in generator.stream(ids, options))
    for piece in pieces:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tokens = generator.tokens
    stats = generator.stats.to_dict()
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    if as_json:
        print(json.dumps({"ok": True, "prompt_ids": ids, "token_ids": tokens, "text": text, "stats": stats}))
        return
    print()
    print(f"prompt {stats['prompt_tokens']} tokens: prefill {stats['prefill_seconds'] * 1e3:.1f} ms, "
          f"first token after {stats['first_token_seconds'] * 1e3:.1f} ms; "
          f"decode {stats['decode_steps']} tokens at {stats['decode_tokens_per_second']:.1f} tokens/s",
          file=sys.stderr)
