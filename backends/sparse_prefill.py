"""The sparse prefill path of one attention layer: score, select, build page lists, execute.

Per scheduler step the metadata builder decides which requests run sparse
(``plan_sparse_requests``; the others run on stock FA) and plans them once (``SparseStep``, including the executor's own
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


def sparse_requests(query_start_loc_cpu, seq_lens_cpu, *, min_sparse_tokens: int,
                    block_size: int) -> list[int]:
    """The batch's requests that run sparse: prefill chunks of at least one block whose sequence
    (context + chunk) reaches ``min_sparse_tokens``, wherever they sit in the batch (vLLM's model
    runner V2 orders decodes first and prefills by ascending query length, so a long sequence's
    short last chunk can precede a short prompt with a longer query). The others run on stock
    FA (``stock_segments``)."""
    # via .tolist(): iterating a tensor element by element costs microseconds per request.
    qsl, lens = _ints(query_start_loc_cpu), _ints(seq_lens_cpu)
    return [r for r in range(len(lens))
            if qsl[r + 1] - qsl[r] >= block_size and lens[r] >= min_sparse_tokens]


def stock_segments(num_reqs: int, sparse: list[int]) -> list[tuple[int, int]]:
    """The maximal request ranges ``[a, b)`` with no sparse request: one stock FA call each."""
    segs, a = [], 0
    for r in sparse + [num_reqs]:
        if r > a:
            segs.append((a, r))
        a = r + 1
    return segs


@dataclass(frozen=True)
class SparseSplit:
    """One step's split of the batch: the sparse requests (planned together) and the stock
    segments around them."""

    requests: list[int]  # sparse requests, ascending
    stock: list[tuple[int, int]]  # request ranges [a, b) on stock FA
    plan: XAttnPlan  # on the host; query rows relative to the first sparse request's first token
    tok_start: int  # the sparse requests' tokens lie in [tok_start, tok_end) of the batch
    tok_end: int
    # Runs of adjacent sparse requests: (first token relative to tok_start, first row of the
    # packed query without the stock requests between them, tokens).
    runs: tuple[tuple[int, int, int], ...]


def plan_sparse_requests(query_start_loc_cpu, seq_lens_cpu, cfg: XAttnConfig, **tiles) -> SparseSplit | None:
    """The batch's sparse requests and their host-side plan, or None if none qualifies.

    ``query_start_loc_cpu`` [R+1] and ``seq_lens_cpu`` [R] are the batch's CPU copies. The plan
    packs the sparse requests' query rows (those of stock requests between them are left out)
    and reads each request's query at its place in ``[tok_start, tok_end)``. ``tiles``:
    ``plan_prefill``'s tile arguments (``min_tiles`` from the builder; ``block_m`` / ``block_n``
    in tests).
    """
    qsl, lens = _ints(query_start_loc_cpu), _ints(seq_lens_cpu)  # one host conversion per step
    sparse = sparse_requests(qsl, lens, min_sparse_tokens=cfg.min_sparse_tokens, block_size=cfg.block_size)
    if not sparse:
        return None
    tok_start = qsl[sparse[0]]
    packed, runs = [0], []
    for i, r in enumerate(sparse):
        n = qsl[r + 1] - qsl[r]
        if i and sparse[i - 1] == r - 1:
            src, dst, m = runs[-1]
            runs[-1] = (src, dst, m + n)
        else:
            runs.append((qsl[r] - tok_start, packed[-1], n))
        packed.append(packed[-1] + n)
    plan = plan_prefill(packed, [lens[r] for r in sparse], block_size=cfg.block_size, stride=cfg.stride,
                        q_starts=[qsl[r] - tok_start for r in sparse], **tiles)
    return SparseSplit(requests=sparse, stock=stock_segments(len(lens), sparse), plan=plan,
                       tok_start=tok_start, tok_end=qsl[sparse[-1] + 1], runs=tuple(runs))


@dataclass
class SparseStep:
    """What one scheduler step's sparse requests look like (shared by all layers)."""

    plan: XAttnPlan  # on the device
    block_table: torch.Tensor  # [R_sparse, max_pages] rows of the sparse requests
    tok_start: int  # their query rows lie in [tok_start, tok_end) of the batch
    tok_end: int
    # (first token relative to tok_start, packed row, tokens) per run of adjacent sparse
    # requests (``SparseSplit.runs``); one run, all of [tok_start, tok_end), if they are adjacent.
    runs: tuple[tuple[int, int, int], ...]
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
                       selection_heads: int, device, executor=FA3, runs=None,
                       block_table_rows: list[int] | None = None) -> "SparseStep":
        """``plan`` on the host; ``executor`` plans its own part here, once per step (for
        FlashInfer the expensive host ``plan()``), never per layer. ``block_table_rows``: the
        sparse requests' rows of ``block_table`` (the batch's), gathered on the device; None:
        ``block_table`` is theirs already. ``runs``: ``SparseSplit.runs``; None: the plan's
        requests are adjacent, one run over ``[tok_start, tok_end)``."""
        order = (executor or FA3).mini_order(plan, selection_heads=selection_heads)
        candidates = plan.causal_blocks()
        ex_step = (executor.plan_step(plan, selection_heads=selection_heads, device=device)
                   if executor is not None else None)
        rows = None if block_table_rows is None else torch.tensor(block_table_rows, dtype=torch.int32)
        dev_plan, row_pos, cu, used_q, rows = plan.to(device, *order, rows)  # one pinned copy
        if rows is not None:
            block_table = block_table.index_select(0, rows)
        return cls(plan=dev_plan, block_table=block_table, tok_start=tok_start, tok_end=tok_end,
                   runs=runs or ((0, 0, tok_end - tok_start),), mini_cu_seqlens_q=cu, mini_row_pos=row_pos,
                   mini_seqused_q=used_q, executor=executor, executor_step=ex_step,
                   candidate_blocks=candidates)

    @classmethod
    def from_split(cls, split: SparseSplit, *, block_table, **kw) -> "SparseStep":
        """The step of ``plan_sparse_requests``'s split; ``block_table``: the batch's."""
        reqs = split.requests
        contiguous = len(split.runs) == 1  # adjacent requests: a slice of the batch's block table
        return cls.from_host_plan(
            split.plan, block_table=block_table[reqs[0]: reqs[-1] + 1] if contiguous else block_table,
            block_table_rows=None if contiguous else reqs, tok_start=split.tok_start,
            tok_end=split.tok_end, runs=split.runs, **kw)

    @property
    def num_tokens(self) -> int:
        """Query rows the sparse path computes."""
        return self.plan.num_q_tokens


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
        """Attention of the step's sparse requests (``query[tok_start:tok_end]`` but for the rows
        of stock requests between them) into ``output`` rows; returns the selection
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
        T = plan.num_q_tokens  # q's rows without those of stock requests between sparse ones
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
        for src, dst, n in step.runs:
            copy_tokens_heads(q_hm.transpose(0, 1)[dst:dst + n], q[src:src + n].reshape(n, heads, group, self.d))
        o_hm = pool.out[: T * self.hq * self.d].view(heads, T, group, self.d)
        step.executor.run(q_hm.view(heads * T, group, self.d), o_hm.view(heads * T, group, self.d),
                          counts, ids, kv_cache, step, pool, granularity=cfg.granularity,
                          num_kv_heads=self.hkv, scale=self.scale)
        out = output[step.tok_start:step.tok_end]
        for src, dst, n in step.runs:
            copy_tokens_heads(out[src:src + n].view(n, heads, group, self.d), o_hm.transpose(0, 1)[dst:dst + n])
        return counts
