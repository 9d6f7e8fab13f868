"""How stable FLASH_ATTN's own greedy tokens are when only the batching changes, next to XATTN at
threshold 1.0, on the real-model test's prompts (tests/test_gpu_real_model.py: 22 prompts, 4K-30K
tokens mixed with short ones, a cached 12K prefix). It measured the near-tie margin that test
allows (tests/e2e_util.py: NEAR_TIE_MARGIN).

    XATTN_QWEN_DIR=... XATTN_TEXT=... python scripts/batch_invariance.py --out benchmarks/results/batch_invariance_h100.json
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.e2e_util import generate, token_mismatches  # noqa: E402
from tests.test_gpu_real_model import MODEL, real_prompts  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="batch_invariance.json")
    args = ap.parse_args()
    prompts = real_prompts()
    common = dict(model=MODEL, max_model_len=32768, max_num_batched_tokens=8192,
                  enable_prefix_caching=True, gpu_memory_utilization=0.5, seed=0)
    ref = generate({**common, "attention_backend": "FLASH_ATTN"}, prompts, 24, top_logprobs=2)
    runs = {
        "FLASH_ATTN, 16384-token steps": ({**common, "attention_backend": "FLASH_ATTN",
                                           "max_num_batched_tokens": 16384}, prompts),
        "FLASH_ATTN, prompts in reverse order": ({**common, "attention_backend": "FLASH_ATTN"}, prompts[::-1]),
        "XATTN threshold 1.0": ({**common, "attention_backend": "XATTN", "additional_config": {
            "xattn": {"threshold": 1.0, "min_sparse_tokens": 4096}}}, prompts),
    }
    res = {"reference": "FLASH_ATTN, 8192-token steps, the prompts in the test's order"}
    for name, (kw, ps) in runs.items():
        g = generate(kw, ps, 24, top_logprobs=2)
        toks = g.tokens[::-1] if ps is not prompts else g.tokens
        top = g.top[::-1] if ps is not prompts else g.top
        res[name] = token_mismatches(toks, ref, prompts) or f"{len(prompts)}/{len(prompts)} identical"
        res[f"{name}: top-2 per token"] = top
        print(name, "->", res[name], flush=True)
    res["reference: top-2 per token"] = ref.top

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    rec = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "commit": os.environ.get("XATTN_COMMIT", commit), "command": " ".join(sys.argv), "results": res}
    with open(args.out, "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
