"""Triton kernels of vllm-xattn: scoring, selection and page lists over vLLM's paged KV cache.

Per scheduler step: ``plan = plan_prefill(...).to(device)`` (host metadata, one copy). Per layer:
``A = antidiagonal_scores_paged(q, kv_cache, block_table, plan, keys=...)`` (on Hopper whole
tiles read keys through TMA: a context-free request's own ``keys``, or a contiguous copy of the
plan's long requests, ``copy_keys``) ->
``counts, ids = select_blocks_packed(A, plan, ...)`` ->
``lists = build_page_lists(counts, ids, block_table, kv_cache, plan)`` (padded, FA3) or
``build_page_csr(...)`` (CSR, FlashInfer) -> executor over ``folded_kv_views(kv_cache)``. No host synchronisation after the plan.
"""

from .key_copy import (
    copy_keys, key_copy_capacity, key_copy_min_len, key_copy_rows, serving_key_copy, tma_device,
)
from .layout import copy_tokens_heads
from .page_lists import PageCSR, PageLists, build_page_csr, build_page_lists
from .paged import folded_kv_views, make_paged_cache, split_kv
from .plan import XAttnPlan, min_scoring_tiles, plan_prefill, scoring_tile_heights
from .scoring import antidiagonal_scores_paged, scoring_programs, scoring_workspace_numel, unpack_scores
from .selection import masks_from_selection, select_blocks_packed, selection_block_k

__all__ = [
    "PageCSR",
    "PageLists",
    "XAttnPlan",
    "antidiagonal_scores_paged",
    "build_page_csr",
    "build_page_lists",
    "copy_keys",
    "copy_tokens_heads",
    "folded_kv_views",
    "key_copy_capacity",
    "key_copy_min_len",
    "key_copy_rows",
    "make_paged_cache",
    "masks_from_selection",
    "min_scoring_tiles",
    "plan_prefill",
    "scoring_programs",
    "scoring_tile_heights",
    "scoring_workspace_numel",
    "select_blocks_packed",
    "selection_block_k",
    "serving_key_copy",
    "split_kv",
    "tma_device",
    "unpack_scores",
]
