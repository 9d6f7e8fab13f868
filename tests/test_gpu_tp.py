"""Tensor parallelism on two GPUs with the real Qwen2.5-Coder-0.5B (14 q / 2 kv heads: 7 q and
1 kv head per rank): identical tokens at threshold 1.0, and the same selections per head as
on one GPU (compared through the density the ranks log per global query head).

Needs two GPUs, XATTN_QWEN_DIR and XATTN_TEXT (see tests/test_gpu_real_model.py)."""
import pytest
import torch

from tests.e2e_util import NEAR_TIE_MARGIN, generate, generate_in_subprocess, token_mismatches
from tests.test_gpu_real_model import MODEL, needs_model, real_prompts

pytestmark = [pytest.mark.gpu, needs_model,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]

# Eager (no torch.compile, no CUDA graphs): TP is about how heads are split over ranks, and
# eager engines start in a fraction of the time; tests/test_gpu_e2e.py covers CUDA graphs.
COMMON = dict(model=MODEL, max_model_len=32768, max_num_batched_tokens=8192,
              enable_prefix_caching=True, gpu_memory_utilization=0.5, seed=0, enforce_eager=True)


def test_tp2_threshold_one_identical_tokens():
    prompts = real_prompts(n_long=6, n_short=3)
    tp = {**COMMON, "tensor_parallel_size": 2}
    ref = generate({**tp, "attention_backend": "FLASH_ATTN"}, prompts, 16, top_logprobs=2)
    got, log = generate_in_subprocess(
        {**tp, "attention_backend": "XATTN",
         "additional_config": {"xattn": {"threshold": 1.0, "min_sparse_tokens": 4096}}}, prompts, 16)
    assert "XATTN sparse prefill running" in log
    # near-ties as in tests/test_gpu_real_model.py
    assert not (why := token_mismatches(got, ref, prompts, tie_margin=NEAR_TIE_MARGIN)), why


def test_tp2_selects_like_one_gpu(tmp_path):
    from vllm_xattn.backends.density_log import ENV_VAR, read_density

    prompts = real_prompts(n_long=4, n_short=0, seed=1)
    xattn = {"attention_backend": "XATTN",
             "additional_config": {"xattn": {"threshold": 0.9, "min_sparse_tokens": 4096}}}
    per_head = {}
    for tp in (1, 2):
        d = tmp_path / f"tp{tp}"
        generate_in_subprocess({**COMMON, **xattn, "tensor_parallel_size": tp}, prompts, 1,
                               env={ENV_VAR: str(d)})
        per_head[tp] = read_density(d)["per_head"]
    one, two = per_head[1], per_head[2]
    assert len(one) == 24 * 14 and set(one) == set(two), "every (layer, query head) on both"
    diffs = [abs(one[k] - two[k]) for k in one]
    # TP changes the reduction order of the row-parallel projections, so Q/K differ in the last
    # bf16 bits and near-ties can flip; the selections must still agree to a small fraction.
    assert sum(diffs) / len(diffs) < 0.005 and max(diffs) < 0.03, (sum(diffs) / len(diffs), max(diffs))
