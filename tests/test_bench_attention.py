"""bench_attention.executor_flops counts the same FLOPs whatever the mini-request order."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_attention import executor_flops  # noqa: E402

from vllm_xattn.kernels import plan_prefill  # noqa: E402
from vllm_xattn.kernels.page_lists import PageLists  # noqa: E402


def test_executor_flops_order_independent():
    # two requests, one with context ending mid-block: partial first and last blocks
    plan = plan_prefill([0, 300, 500], [300, 777], block_size=128, stride=16)
    heads = 3
    keys = plan.row_block.long() * 128 + plan.row_last_len.long()  # every causal key: dense
    sorted_lists = PageLists(page_table=torch.zeros(0), seqused_k=keys.repeat(heads).int(),
                             cu_seqlens_q=plan.mini_cu_seqlens_q(heads), max_seqlen_q=128,
                             max_seqlen_k=int(keys.max()))
    row_pos, starts, used_q = plan.mini_requests_longest_first(heads)
    by_pos = torch.empty_like(row_pos)
    by_pos[row_pos.long()] = torch.arange(row_pos.numel(), dtype=torch.int32)
    lf_lists = PageLists(page_table=torch.zeros(0), seqused_k=keys[by_pos.long()].repeat(heads).int(),
                         cu_seqlens_q=starts, max_seqlen_q=128, max_seqlen_k=int(keys.max()),
                         seqused_q=used_q)
    fl = executor_flops(sorted_lists, 1, 64)
    assert fl == executor_flops(lf_lists, 1, 64)
    # every key of every query row is causal attention over the whole batch, per head
    want = 0.0
    for tq, n in ((300, 300), (200, 777)):
        want += 4.0 * 64 * heads * (tq * (n - tq) + tq * (tq + 1) / 2)
    assert fl == want
