"""Compile the sparse path's Triton kernels before serving, not at the first long prompt.

Triton compiles a kernel for each new combination of its constexprs (and of the
divisible-by-16 class of the ints it specialises on). Within one engine the sparse path's
kernels vary in only two of them:

- scoring's tile height ``BLOCK_M``: 128 super-rows, halved (down to 16, and at least B/S)
  in steps too small to give every SM a work item (``plan.min_scoring_tiles``);
- selection's ``BLOCK_K``: the next power of two of the step's key blocks, which grows with
  the longest sequence in the step, from ``min_sparse_tokens`` to ``max_model_len``;
- scoring's ``TMA``: on in steps that copy keys for its whole tiles (``key_copy_min_len``) or
  read a context-free request's keys from the layer's own keys, off in the others (the key
  source's strides fall in one specialisation class either way).

Everything else they specialise on is fixed for the engine (head counts and size, page size,
the scratch pool's strides, the classes of the cache and query strides); per-step ints are
``do_not_specialize``. So one synthetic one-block chunk per variant, run through the real
sparse path with every page pointing at page 0 of a one-page cache, compiles everything that
serving can ask for, in a few small launches. vLLM's JIT monitor, active after warm-up,
warns about any Triton compile during serving ("consider extending warmup"); without this
the first sparse prefill after a start compiled 4-8 kernels (about 2 s from a cold cache).
The warm-up compiles more variants than one prompt needs: 7.4-7.8 s at engine start on the
H100 with a cold Triton cache (5-6 shapes; benchmarks/results/logs/latency_*_32k*_h100/).
"""
from __future__ import annotations

import math
import time

import torch
from vllm.logger import init_logger

from vllm_xattn.config import XAttnConfig
from vllm_xattn.kernels import plan_prefill, scoring_tile_heights, selection_block_k
from vllm_xattn.kernels.scoring import tma_supported

logger = init_logger("vllm.xattn")


def warmup_shapes(cfg: XAttnConfig, *, max_model_len: int) -> list[tuple[int, int]]:
    """(sequence length, scoring block_m) of the synthetic chunks (each the last B tokens of
    the sequence) that together reach every kernel variant a sparse step can hit; empty when no
    request can run sparse (``min_sparse_tokens > max_model_len``)."""
    B = cfg.block_size
    if cfg.min_sparse_tokens > max_model_len:
        return []
    kb_max = math.ceil(max_model_len / B)
    # one length per selection BLOCK_K: the longest whose key blocks map to it
    longest = {}
    for kb in range(math.ceil(cfg.min_sparse_tokens / B), kb_max + 1):
        longest[selection_block_k(kb)] = kb
    lens = sorted(set(max(min(kb * B, max_model_len), B) for kb in longest.values()))
    block_ms = scoring_tile_heights(B, cfg.stride)
    # every length at the default tile; the smaller tiles once, at the shortest length
    return [(n, block_ms[0]) for n in lens] + [(lens[0], bm) for bm in block_ms[1:]]


def one_page_cache(num_kv_heads: int, page_size: int, head_dim: int, dtype, device) -> torch.Tensor:
    """A zero cache of one page in vLLM's logical ``(pages, Hkv, page, 2D)`` view over the
    physical NHD order. Its strides fall in the same specialisation classes as any real cache
    (all multiples of 16 but the last, 1), so the kernels compiled on it are the ones serving runs."""
    phys = torch.zeros(1, page_size, num_kv_heads, 2 * head_dim, dtype=dtype, device=device)
    return phys.permute(0, 2, 1, 3)


def warm_up_sparse_path(sparse, pool, query: torch.Tensor, *, executor, page_size: int, kv_dtype,
                        max_model_len: int, selection_heads: int) -> int:
    """Runs ``sparse`` (a ``SparsePrefill``) over each ``warmup_shapes`` chunk, with the first
    B rows of ``query`` (the layer's real query tensor: real strides) and ``pool``'s buffers,
    on a one-page cache. Returns the number of chunks run (0: nothing to warm)."""
    from vllm_xattn.backends.sparse_prefill import SparseStep

    cfg = sparse.cfg
    B = cfg.block_size
    shapes = warmup_shapes(cfg, max_model_len=max_model_len)
    if not shapes or executor is None or query.shape[0] < B or torch.cuda.is_current_stream_capturing():
        return 0
    t0 = time.perf_counter()
    kv = one_page_cache(sparse.hkv, page_size, sparse.d, kv_dtype, query.device)
    block_table = torch.zeros(1, math.ceil(max_model_len / page_size), dtype=torch.int32,
                              device=query.device)
    q = query[:B]
    out = torch.empty(B, sparse.hq, sparse.d, dtype=query.dtype, device=query.device)
    for n, block_m in shapes:
        plan = plan_prefill([0, B], [n], block_size=B, stride=cfg.stride, block_m=block_m)
        step = SparseStep.from_host_plan(plan, block_table=block_table, tok_start=0, tok_end=B,
                                         selection_heads=selection_heads, device=query.device,
                                         executor=executor)
        # Scoring compiles apart with and without its TMA path (steps that copy keys or have a
        # request without context take it); these chunks do neither, so both are asked for.
        for tma in (True, False) if tma_supported(q, kv) else (False,):
            sparse.run(q, kv, step, out, pool, tma=tma)
    torch.cuda.synchronize(query.device)
    logger.info("XATTN: compiled and ran the sparse path's kernels for %d warm-up shapes in %.1f s",
                len(shapes), time.perf_counter() - t0)
    return len(shapes)
