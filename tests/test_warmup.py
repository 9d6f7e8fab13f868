"""The warm-up's synthetic chunks reach every kernel variant a sparse step can hit: each
selection BLOCK_K of a request length between min_sparse_tokens and max_model_len, and each
scoring tile height plan_prefill can pick."""
import math

import pytest

from vllm_xattn.backends.warmup import warmup_shapes
from vllm_xattn.config import XAttnConfig
from vllm_xattn.kernels import scoring_tile_heights, selection_block_k


@pytest.mark.parametrize("knobs, max_len", [({}, 131072), ({}, 40000), ({"stride": 4}, 32768),
                                            ({"min_sparse_tokens": 100, "block_size": 64}, 1000)])
def test_warmup_shapes_cover_every_variant(knobs, max_len):
    cfg = XAttnConfig(**knobs)
    B = cfg.block_size
    shapes = warmup_shapes(cfg, max_model_len=max_len)
    reachable = {selection_block_k(kb) for kb in range(math.ceil(cfg.min_sparse_tokens / B), math.ceil(max_len / B) + 1)}
    assert {selection_block_k(math.ceil(n / B)) for n, _ in shapes} == reachable
    assert sorted({bm for _, bm in shapes}, reverse=True) == scoring_tile_heights(B, cfg.stride)
    assert all(B <= n <= max_len for n, _ in shapes) and len(shapes) == len(set(shapes))


def test_no_warmup_when_nothing_can_run_sparse():
    assert warmup_shapes(XAttnConfig(), max_model_len=8000) == []
