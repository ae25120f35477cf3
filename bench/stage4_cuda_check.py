"""On the GPU machine: greedy generation with the CUDA generation artifacts in a folder (tiny models,
built here with --kv-cache) against transformers on the GPU; caches written in place, device memory flat.

    python3 bench/stage4_cuda_check.py OUT.json ARTIFACTS_DIR
"""
import json, sys, time
from pathlib import Path
import torch, numpy as np
import slimgraph
from slimgraph.models import testmodels
here = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent
prompt = [5, 17, 99, 3, 42, 7]
out = {}
for art in sorted(p for p in here.iterdir() if p.is_dir()):
    name = art.name.rsplit("-cuda-", 1)[0]
    hf = testmodels.TINY_HF_MODELS[name]().cuda()
    ids = torch.tensor([prompt]).cuda()
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    try:
        m = slimgraph.load(art)
        r = m.generate(prompt, max_new_tokens=24, stop_tokens=())
        gen = m.generator
        before = [c.data_ptr() for c in gen.caches]
        free0 = torch.cuda.mem_get_info()[0]
        gen.prefill(prompt[:1]); tok = prompt[0]
        for i in range(38):
            tok = int(gen.decode(tok).argmax())
        free1 = torch.cuda.mem_get_info()[0]
        out[art.name] = {"tokens": r.token_ids, "hf": ref, "equal": sum(a == b for a, b in zip(r.token_ids, ref)),
                         "decode_tok_s": r.stats.decode_tokens_per_second,
                         "cache_ptrs_unchanged": before == [c.data_ptr() for c in gen.caches],
                         "device_free_bytes_change_over_38_steps": free1 - free0}
    except Exception as e:
        out[art.name] = {"error": repr(e)[:500]}
    print(art.name, out[art.name], flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
