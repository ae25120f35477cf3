"""``make demo``: run a compiled SmolLM2 artifact on a prompt and check it against PyTorch.

    python -m slimgraph.models.demo out/smollm2 [--prompt TEXT] [--tokens N]

Greedy decoding by re-running the whole prompt each step (the KV-cache decode path belongs to the
generation API). The first step's logits are compared with transformers' fp32 model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import slimgraph
from slimgraph.models.registry import resolve_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = json.loads((args.artifact / "manifest.json").read_text())["input_model"]["name"]
    folder = resolve_model(name).path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = slimgraph.load(args.artifact)
    ids = np.asarray([tokenizer(args.prompt)["input_ids"]], np.int64)
    first_logits, times = None, []
    for _ in range(args.tokens):
        t0 = time.perf_counter()
        logits = model(input_ids=ids)[0]
        times.append(time.perf_counter() - t0)
        first_logits = logits if first_logits is None else first_logits
        ids = np.concatenate([ids, [[int(np.argmax(logits[0, -1]))]]], axis=1)
    print(f"prompt:    {args.prompt!r}")
    print(f"slimgraph: {tokenizer.decode(ids[0], skip_special_tokens=True)!r}")
    print(f"forward:   {1e3 * float(np.median(times)):.1f} ms median over {len(times)} steps (prompt grows each step)")
    import torch

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(torch.from_numpy(ids[:, :first_logits.shape[1]]), use_cache=False).logits.numpy()
    a, b = first_logits.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"vs torch:  cosine {cosine:.7f}, max abs err {np.abs(first_logits - expected).max():.2e} "
          f"(max |logit| {np.abs(expected).max():.1f})")


if __name__ == "__main__":
    main()
