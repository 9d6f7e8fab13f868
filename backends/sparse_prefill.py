"""The sparse prefill path of one attention layer: score, select, build page lists, execute.

Per scheduler step the metadata builder decides which requests run sparse
(``choose_sparse_suffix``) and plans them once (``SparseStep``, including the executor's own
step plan); per layer, ``SparsePrefill.run`` launches the Triton scoring / selection kernels
and the executor (``executors.py``: FA3 or FlashInfer) over vLLM's paged cache, with no host
synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from vllm.logger import init_logger

from vllm_xattn.backends.executors import FA3, FlashInferContext
from vllm_xattn.config import XAttnConfig
from vllm_xattn.kernels import (
    XAttnPlan,
    antidiagonal_scores_paged,
    copy_tokens_heads,
    key_copy_capacity,
    key_copy_min_len,
    plan_prefill,
    scoring_programs,
    scoring_workspace_numel,
    select_blocks_packed,
    tma_device,
)
from vllm_xattn.kernels.plan import _ints

logger = init_logger("vllm.xattn")


def choose_sparse_suffix(query_start_loc_cpu, seq_lens_cpu, *, min_sparse_tokens: int,
                         block_size: int) -> int | None:
    """First request of the batch's sparse suffix, or None if no request runs sparse.

    A request qualifies if it is a prefill chunk of at least one block whose sequence
    (context + chunk) reaches ``min_sparse_tokens``. vLLM's model runner V2 orders
    decodes first and prefills by ascending query length, so full-size chunks of long
    prompts form a suffix; the sparse path takes the longest suffix of qualifying requests.
    A qualifying request before a non-qualifying one runs dense (slower, never wrong): in
    V2's order, a long sequence's short chunk (a prompt's last chunk, a prefix-cache hit)
    followed by a shorter prompt with a longer query.
    """
    first, _ = _sparse_suffix(query_start_loc_cpu, seq_lens_cpu, min_sparse_tokens=min_sparse_tokens,
                              block_size=block_size)
    return first


def _sparse_suffix(query_start_loc_cpu, seq_lens_cpu, *, min_sparse_tokens: int,
                   block_size: int) -> tuple[int | None, int]:
    """(first request of the sparse suffix or None, qualifying requests before it: the ones
    the batch order makes run dense)."""
    # via .tolist(): iterating a tensor element by element costs microseconds per request.
    qsl, lens = _ints(query_start_loc_cpu), _ints(seq_lens_cpu)
    qualifies = [qsl[r + 1] - qsl[r] >= block_size and lens[r] >= min_sparse_tokens
                 for r in range(len(lens))]
    first = len(lens)
    while first > 0 and qualifies[first - 1]:
        first -= 1
    return (first if first < len(lens) else None), sum(qualifies[:first])


def plan_sparse_suffix(query_start_loc_cpu, seq_lens_cpu, cfg: XAttnConfig,
                       **tiles) -> tuple[int, XAttnPlan] | None:
    """The sparse suffix of a batch (its first request) and its host-side plan, or None.

    ``query_start_loc_cpu`` [R+1] and ``seq_lens_cpu`` [R] are the batch's CPU copies; the
    plan's query rows are relative to the suffix's first token. ``tiles``: ``plan_prefill``'s
    tile arguments (``min_tiles`` from the builder; ``block_m`` / ``block_n`` in tests).
    """
    qsl, lens = _ints(query_start_loc_cpu), _ints(seq_lens_cpu)  # one host conversion per step
    first, skipped = _sparse_suffix(qsl, lens, min_sparse_tokens=cfg.min_sparse_tokens,
                                    block_size=cfg.block_size)
    if skipped:
        # Never silent: a request the sparse path skips follows a long prefill, so that prefill
        # runs dense this step (V2's query-length order does this too, see the message).
        logger.warning_once(
            "XATTN: a long prefill ran dense because a request too short for the sparse path "
            "followed it in the batch; correct, but slower. The sparse rows must be the batch's "
            "last requests, and vLLM's model runner orders prefills by query length, so a long "
            "sequence's short chunk (a last chunk, a prefix-cache hit) can precede a short "
            "prompt with a longer query.")
    if first is None:
        return None
    plan = plan_prefill([x - qsl[first] for x in qsl[first:]], lens[first:],
                        block_size=cfg.block_size, stride=cfg.stride, **tiles)
    return first, plan


@dataclass
class SparseStep:
    """What one scheduler step's sparse requests look like (shared by all layers)."""

    plan: XAttnPlan  # on the device
    block_table: torch.Tensor  # [R_sparse, max_pages] rows of the sparse requests
    tok_start: int  # their query rows in the batch: [tok_start, tok_end)
    tok_end: int
    # The executor's mini-requests over the head-major query, per selection granularity,
    # derived from the plan once per step instead of in every layer: query offsets, and for an
    # order other than the layout's, each packed row's position and the query lengths
    # (``build_page_lists``).
    mini_cu_seqlens_q: torch.Tensor | None = None
    mini_row_pos: torch.Tensor | None = None
    mini_seqused_q: torch.Tensor | None = None
    # Causal (query block, key block) pairs per head: the denominator of the density.
    candidate_blocks: int = 0
    executor: object = FA3  # None: no executor available (no layer runs sparse)
    executor_step: object = None  # the executor's per-step plan (FlashInfer's)

    @classmethod
    def from_host_plan(cls, plan: XAttnPlan, *, block_table, tok_start: int, tok_end: int,
                       selection_heads: int, device, executor=FA3) -> "SparseStep":
        """``plan`` on the host; ``executor`` plans its own part here, once per step (for
        FlashInfer the expensive host ``plan()``), never per layer."""
        order = (executor or FA3).mini_order(plan, selection_heads=selection_heads)
        candidates = plan.causal_blocks()
        ex_step = (executor.plan_step(plan, selection_heads=selection_heads, device=device)
                   if executor is not None else None)
        dev_plan, row_pos, cu, used_q = plan.to(device, *order)  # one pinned copy
        return cls(plan=dev_plan, block_table=block_table, tok_start=tok_start,
                   tok_end=tok_end, mini_cu_seqlens_q=cu, mini_row_pos=row_pos, mini_seqused_q=used_q,
                   executor=executor, executor_step=ex_step, candidate_blocks=candidates)


class ScratchPool:
    """Buffers of the sparse path, sized once from the scheduler limits.

    Allocated the first time it is needed, which is vLLM's memory-profiling forward pass
    (``attn_metadata is None``) when possible, so the profiler counts it and the KV cache
    is sized around it. One pool per process and device: layers run one after another.
    """

    _pools: dict[tuple, "ScratchPool"] = {}

    def __init__(self, *, max_tokens, max_reqs, max_seq_len, num_q_heads, head_dim, dtype,
                 cfg: XAttnConfig, page_size: int, device, executor: str = "fa3",
                 num_kv_heads: int | None = None):
        B, S = cfg.block_size, cfg.stride
        max_kb = math.ceil(max_seq_len / B)
        # A chunk of Tq tokens starting anywhere touches at most Tq/B + 2 query blocks, and a
        # sparse request has >= B query tokens, so at most max_tokens/B of them fit a step.
        max_rows = math.ceil(max_tokens / B) + 2 * min(max_reqs, max_tokens // B)
        device = torch.device(device)
        self.num_programs = scoring_programs(device)
        bound = SimpleNamespace(  # the plan of the longest possible request
            block_size=B, stride=S, block_m=XAttnPlan.DEFAULT_BLOCK_M,
            block_n=XAttnPlan.DEFAULT_BLOCK_N,
            max_key_tiles=math.ceil(math.ceil(max_seq_len / S) / XAttnPlan.DEFAULT_BLOCK_N) + 1)
        self.scores = torch.empty(num_q_heads, max_rows, max_kb, dtype=torch.float32, device=device)
        self.workspace = torch.empty(scoring_workspace_numel(bound, self.num_programs),
                                     dtype=torch.float32, device=device)
        # FA3: one padded row per mini-request; FlashInfer: the same storage as flat CSR indices.
        self.page_table = torch.empty(num_q_heads * max_rows, max_kb * (B // page_size),
                                      dtype=torch.int32, device=device)
        self.fi_indptr = torch.empty(num_q_heads * max_rows + 1, dtype=torch.int32, device=device)
        self.fi_last_page_len = torch.empty(num_q_heads * max_rows, dtype=torch.int32, device=device)
        if executor == "flashinfer":  # its buffers, and its JIT build now rather than mid-serving
            FlashInferContext.reserve(device, dtype=dtype, head_dim=head_dim, page_size=page_size)
        # Scoring's key copy (kernels/key_copy.py) for its TMA loads, where the GPU has TMA and a
        # request can be long enough to be copied: room for one request of max_seq_len keys (the
        # builder plans the copy within it).
        self.keys = None
        if (num_kv_heads is not None and tma_device(device, dtype)
                and key_copy_min_len(S, num_q_heads, num_kv_heads) <= max_seq_len):
            self.keys = torch.empty(key_copy_capacity(max_seq_len), num_kv_heads * head_dim, dtype=dtype,
                                    device=device)
        self.q = torch.empty(max_tokens * num_q_heads * head_dim, dtype=dtype, device=device)
        self.out = torch.empty_like(self.q)
        self.warmed = False  # kernels compiled on this pool (backends/warmup.py)

    @classmethod
    def get(cls, **kw) -> "ScratchPool":
        key = tuple(sorted((k, str(v)) for k, v in kw.items()))
        if key not in cls._pools:
            cls._pools[key] = cls(**kw)
        return cls._pools[key]

    def key_copy_fits(self, plan: XAttnPlan) -> bool:
        """Whether scoring can copy the plan's keys into the pool for its TMA loads. The builder
        plans the copy within the pool (``key_copy_capacity``); a plan made without that bound
        (tests, benchmarks) that needs more scores from the paged cache alone: slower, same scores."""
        if self.keys is None:
            return False
        if plan.key_copy_rows > self.keys.shape[0]:
            logger.warning_once("XATTN: a step's key copy (%d rows) exceeds the scratch pool's %d; "
                                "scoring reads the paged cache", plan.key_copy_rows, self.keys.shape[0])
            return False
        return True

    def check_fits(self, plan: XAttnPlan, num_tokens: int, num_q_heads: int, head_dim: int) -> None:
        """Host-side guard (no sync): a step beyond the bounds the pool was sized for is a bug."""
        if (plan.total_q_blocks > self.scores.shape[1] or plan.max_kb > self.scores.shape[2]
                or num_tokens * num_q_heads * head_dim > self.q.numel()):
            raise RuntimeError(
                f"XATTN scratch too small for this step ({plan.total_q_blocks} query blocks, "
                f"{plan.max_kb} key blocks, {num_tokens} tokens); sized for "
                f"{self.scores.shape[1]} / {self.scores.shape[2]} / {self.q.numel() // (num_q_heads * head_dim)}")


class SparsePrefill:
    """XAttention for the sparse rows of one layer (the layer's impl owns one)."""

    def __init__(self, cfg: XAttnConfig, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, thresholds: torch.Tensor | None):
        self.cfg = cfg
        self.hq, self.hkv, self.d, self.scale = num_q_heads, num_kv_heads, head_dim, scale
        self.thresholds = thresholds  # [Hq] float32 on the device, or None (cfg.threshold)

    @staticmethod
    def _tma(plan: XAttnPlan, pool: ScratchPool, tma: bool | None) -> bool | None:
        """Scoring's ``tma`` argument: off in a step whose key copy the pool has no room for (a plan
        made without the builder's bound: scoring reads the paged cache), else ``tma`` (None:
        scoring's own rule, ``tma_key_source``)."""
        if plan.key_copy_rows > 0 and not pool.key_copy_fits(plan):
            return False
        return tma

    def _tau(self, device) -> torch.Tensor:
        if self.thresholds is None:  # made once, not in every forward
            self.thresholds = torch.full((self.hq,), self.cfg.threshold, dtype=torch.float32,
                                         device=device)
        return self.thresholds

    def run(self, query: torch.Tensor, kv_cache: torch.Tensor, step: SparseStep,
            output: torch.Tensor, pool: ScratchPool, tma: bool | None = None,
            keys: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``query[tok_start:tok_end]`` into ``output`` rows; returns the selection
        counts, int32 [Hq, packed query blocks] on the device (``.sum()``: selected blocks).
        ``keys``: the layer's new keys, rows like ``query``'s (scoring reads those of requests
        with no context through TMA, no copy). ``tma``: scoring's whole-tile TMA path (default:
        when the step copies keys, see ``key_copy_min_len``, or ``keys`` serve; the warm-up
        forces it to compile it)."""
        cfg, plan = self.cfg, step.plan
        if step.executor is None:
            raise RuntimeError("XATTN: this step has no sparse executor (see the layer's dense reasons)")
        q = query[step.tok_start:step.tok_end]
        k = None if keys is None else keys[step.tok_start:step.tok_end]
        T = q.shape[0]
        pool.check_fits(plan, T, self.hq, self.d)
        scores = pool.scores[:, : plan.total_q_blocks, : plan.max_kb]
        a = antidiagonal_scores_paged(q, kv_cache, step.block_table, plan, out=scores,
                                      workspace=pool.workspace, num_programs=pool.num_programs,
                                      key_copy=pool.keys, keys=k, tma=self._tma(plan, pool, tma))
        counts, ids = select_blocks_packed(
            a, plan, mode=cfg.selection,
            threshold=self._tau(q.device),
            topk=cfg.topk, ratio=cfg.ratio, granularity=cfg.granularity,
            num_kv_heads=self.hkv)
        # Mini-requests are contiguous rows of a head-major query: (heads * T, group, D).
        group = self.hq // self.hkv if cfg.granularity == "kv_group" else 1
        heads = self.hq // group
        q_hm = pool.q[: T * self.hq * self.d].view(heads, T, group, self.d)
        copy_tokens_heads(q_hm.transpose(0, 1), q.reshape(T, heads, group, self.d))
        o_hm = pool.out[: T * self.hq * self.d].view(heads, T, group, self.d)
        step.executor.run(q_hm.view(heads * T, group, self.d), o_hm.view(heads * T, group, self.d),
                          counts, ids, kv_cache, step, pool, granularity=cfg.granularity,
                          num_kv_heads=self.hkv, scale=self.scale)
        out = output[step.tok_start:step.tok_end].view(T, heads, group, self.d)
        copy_tokens_heads(out, o_hm.transpose(0, 1))
        return counts
