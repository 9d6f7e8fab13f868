"""Block-sparse executors: exact attention of every mini-request over its selected pages, read
straight from vLLM's paged cache through the KV-head-folded page views (DESIGN.md section 3).

- ``Fa3Executor``: vLLM's FA3 ``flash_attn_varlen_func`` with a padded page table (one row per
  mini-request) and ``seqused_k``; nothing to plan.
- ``FlashInferExecutor``: FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` (backend "fa2",
  NHD) over the same page lists as CSR. Its host ``plan()`` is slow (an O(mini-requests) Python
  loop: ``max()`` over CPU tensors, flashinfer/prefill.py:1969 and :1990), so it runs once per
  scheduler step (``SparseStep.from_host_plan``) while the page lists change in every layer.

Why plan-once / run-per-layer is exact in FlashInfer 0.6.14 (paths in the wheel,
``flashinfer/data/...`` abbreviated to ``csrc/`` and ``include/``):

1. With ``disable_split_kv=True`` the plan depends on the query side only. The scheduler sets
   ``kv_chunk_size`` to the int64 maximum and one KV chunk per request
   (include/flashinfer/attention/scheduler.cuh:567-568, :582), so its work list
   (request / qo-tile / kv-tile indices, o_indptr, cta_tile_q from the mean packed query length)
   is built from ``qo_indptr`` alone (:578-603); ``split_kv`` stays false, so no
   merge buffers or float workspace are used (:770; csrc/batch_prefill.cu:304-313 leaves
   ``tmp_v`` null and include/flashinfer/attention/prefill.cuh:3748-3750 runs with
   ``partition_kv = false``). The KV indptr given to ``plan()`` (our upper bound: every visible
   page) is only read on the host, for that unused chunk search and for ``_max_kv_len`` /
   ``_kv_lens_buffer``, which only the cudnn / trtllm-gen backends read (prefill.py:677-700,
   :2460-2472; the fa2 branch at :718-748 does not take them).
2. The kernel reads the page lists from device memory at run time: ``run()`` passes
   ``_paged_kv_indptr_buf``, ``_paged_kv_indices_buf`` and ``_paged_kv_last_page_len_buf``
   (prefill.py:2496-2498), which outside CUDA-graph mode are just the tensors given to ``plan()``
   (:2043-2053). Each CTA takes ``kv_len = (indptr[b+1] - indptr[b] - 1) * page_size +
   last_page_len[b]`` from them (include/flashinfer/page.cuh:147-152 via
   include/flashinfer/attention/default_prefill_params.cuh:405-407 and variants.cuh:45-46),
   walks keys ``[0, kv_len)`` with ``chunk_end = kv_len`` (prefill.cuh:2931-2946), bounds page
   lookups by ``indptr[batch_size]`` (prefill.cuh:3065, page.cuh:184-190) and masks keys with
   ``kv_idx + qo_len > kv_len + q_idx`` (prefill.cuh:1110): bottom-right causal, like FA3.
   So each layer writes its own CSR (any lengths, shorter or longer than the plan's) into the
   buffers the wrapper reads, with no host sync.

Not sound, and avoided: CUDA-graph mode (``use_cuda_graph=True``) pads the grid beyond the work
list (scheduler.cuh:602-603) but masks padded CTAs only when split-kv is on
(csrc/batch_prefill.cu:309-312), so with split-kv off they would run stale work items; and with
split-kv on, the plan's KV chunking would bake in the plan's lengths. PDL is disabled in
``run()``: the kernel reads ``indptr`` / ``last_page_len`` before ``griddepcontrol.wait``
(prefill.cuh:2931-2933 vs :2979), i.e. possibly before the kernel that wrote them has finished.
"""
from __future__ import annotations

import functools
import importlib

import torch

from vllm.logger import init_logger

from vllm_xattn.kernels import build_page_csr, build_page_lists, folded_kv_views

logger = init_logger("vllm.xattn")

# vLLM 0.26's FlashInferBackend.get_supported_head_sizes (FlashInfer's DISPATCH_HEAD_DIM).
FLASHINFER_HEAD_SIZES = (64, 128, 256, 512)


def resolve_executor(choice: str, *, fa_version: int | None, head_size: int,
                     capability: tuple[int, int] | None) -> tuple[str | None, str | None]:
    """(executor, None), or (None, why no executor can run this layer: it runs dense).

    ``auto`` picks FA3 where vLLM runs FA3 (Hopper): on the H100 the FA3 executor beat this
    FlashInfer (fa2) executor at every measured size and density, on the same page lists
    (benchmarks/results/attention_executors_h100.json, Llama-3.1-8B layer: 128K at 10 %
    density 26.7 ms vs 43.5 ms, 32K 1.7 vs 2.7 ms, 8K 0.19 vs 0.24 ms; FlashInfer also plans
    8-64 ms per step on the host). Elsewhere (vLLM on FA2, e.g. Ampere, or FA4 on Blackwell)
    FA3 is unavailable and FlashInfer runs.
    """
    if choice == "fa3" or (choice == "auto" and fa_version == 3):
        if fa_version == 3:
            return "fa3", None
        return None, f"FlashAttention version {fa_version} (executor fa3 needs FA3)"
    if head_size not in FLASHINFER_HEAD_SIZES:
        why = f"head_size {head_size} (FlashInfer supports {', '.join(map(str, FLASHINFER_HEAD_SIZES))})"
    elif capability is None or capability < (8, 0):
        why = f"compute capability {capability} (FlashInfer needs >= 8.0)"
    else:
        return "flashinfer", None
    if choice == "flashinfer":
        return None, f"executor flashinfer: {why}"
    return None, f"FlashAttention version {fa_version} (no FA3) and no FlashInfer executor: {why}"


@functools.cache
def fa3_takes_seqused_q() -> bool:
    """Whether vLLM's FA3 op takes ``seqused_q`` where vllm 0.26.0's ``flash_attn_varlen_func``
    passes None for it (argument 10 of ``torch.ops._vllm_fa3_C.fwd``; the wrapper itself never
    passes it). Checked by the op's schema, so another vLLM build falls back to sorted order."""
    try:
        importlib.import_module("vllm.vllm_flash_attn.flash_attn_interface")  # loads the op library
        names = [a.name for a in torch.ops._vllm_fa3_C.fwd.default._schema.arguments]
    except Exception:  # no FA3 op in this build
        return False
    return (len(names) == 37 and "cu_seqlens_q" in names[7] and "seqused_q" in names[10]
            and "seqused_k" in names[11] and "table" in names[14])


def fa3_varlen_paged(q, k, v, out, *, cu_seqlens_q, seqused_q, max_seqlen_q, seqused_k,
                     max_seqlen_k, block_table, softmax_scale):
    """``flash_attn_varlen_func(..., causal=True, fa_version=3, num_splits=1)`` as vllm 0.26.0
    calls the op, plus ``seqused_q``: mini-request b's queries are rows
    ``cu_seqlens_q[b] : cu_seqlens_q[b] + seqused_q[b]``, so the offsets need not be sorted."""
    return torch.ops._vllm_fa3_C.fwd(
        q, k, v, None, None, None, out, cu_seqlens_q, None, None, seqused_q, seqused_k,
        max_seqlen_q, max_seqlen_k, block_table, None, None, None, None, None, None, None, None,
        softmax_scale, True, -1, -1, 0.0, True, None, 1, None, 0, None, 1, 0, None)


class _Executor:
    """An executor yields its kernel calls from ``launches`` (benchmarks time them alone);
    ``run`` makes them all."""

    def mini_order(self, plan, *, selection_heads: int):
        """Host, once per step: (row_pos, cu_seqlens_q, seqused_q) of the mini-requests, see
        ``build_page_lists``; here the layout's order (row_pos / seqused_q None)."""
        return None, plan.mini_cu_seqlens_q(selection_heads), None

    def run(self, q, out, counts, ids, kv_cache, step, pool, **kw) -> None:
        """``q`` / ``out``: the head-major query and output ``(heads * T, group, D)``."""
        for launch in self.launches(q, out, counts, ids, kv_cache, step, pool, **kw):
            launch()


class Fa3Executor(_Executor):
    """vLLM's FA3 varlen kernel over a padded per-mini-request page table; no plan."""

    name = "fa3"

    def plan_step(self, plan, *, selection_heads: int, device) -> None:
        return None

    def mini_order(self, plan, *, selection_heads: int):
        """Longest first within each head where the op takes ``seqused_q``. Llama layer, 10 %
        density, same page lists (benchmarks/results/executor_order_h100.json): 128K 24.4 ms
        vs 25.4-26.7 ms for the other orders and 33.3 ms ascending (25.8 ms in an earlier
        run); 32K 1.78 vs 1.86 ms ascending. The layer went from 5.87x to 6.19x dense FA3
        (attention_default_h100.json)."""
        if fa3_takes_seqused_q():
            return plan.mini_requests_longest_first(selection_heads)
        return super().mini_order(plan, selection_heads=selection_heads)

    def launches(self, q, out, counts, ids, kv_cache, step, pool, *, granularity: str,
                 num_kv_heads: int, scale: float):
        """Builds the page lists, then yields the kernel call (benchmarks time it alone)."""
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        lists = build_page_lists(counts, ids, step.block_table, kv_cache, step.plan,
                                 granularity=granularity, num_kv_heads=num_kv_heads,
                                 page_table=pool.page_table, cu_seqlens_q=step.mini_cu_seqlens_q,
                                 row_pos=step.mini_row_pos, seqused_q=step.mini_seqused_q)
        k_pages, v_pages, _ = folded_kv_views(kv_cache)
        # num_splits=1: for varlen calls FA3 sizes its split-KV heuristic as if the batch were
        # one sequence (hopper/flash_api.cpp, get_num_splits after num_splits_dynamic_ptr is set
        # to a dummy): with one head and one 128-row block per mini-request it picks ~109 splits
        # whenever there are <= 992 mini-requests (sparse requests under ~4K tokens at 32 heads)
        # and allocates float32 [splits, heads * T, D] partial outputs: 5.73 GiB at T = 3445,
        # outside vLLM's memory profile (a mixed-serving OOM). Above 992 mini-requests FA3 uses
        # one split anyway; below, splitting only helps steps with few sparse tokens, which are cheap.
        if lists.seqused_q is not None:  # longest-first order (mini_order)
            yield lambda: fa3_varlen_paged(
                q, k_pages, v_pages, out, cu_seqlens_q=lists.cu_seqlens_q, seqused_q=lists.seqused_q,
                max_seqlen_q=lists.max_seqlen_q, seqused_k=lists.seqused_k,
                max_seqlen_k=lists.max_seqlen_k, block_table=lists.page_table, softmax_scale=scale)
            return
        yield lambda: flash_attn_varlen_func(
            q=q, k=k_pages, v=v_pages,
            cu_seqlens_q=lists.cu_seqlens_q, max_seqlen_q=lists.max_seqlen_q,
            seqused_k=lists.seqused_k, max_seqlen_k=lists.max_seqlen_k,
            softmax_scale=scale, causal=True, block_table=lists.page_table,
            fa_version=3, out=out, num_splits=1,
        )


FA3 = Fa3Executor()


class FlashInferStep:
    """One step's FlashInfer plan: ``plan()`` arguments (host tensors) and how many selection
    heads each kernel launch covers."""

    def __init__(self, ctx: FlashInferContext, plan_args: dict, heads_per_run: int,
                 max_pages: int):
        self.ctx = ctx
        self.plan_args = plan_args
        self.heads_per_run = heads_per_run
        self.num_mini = len(plan_args["qo_indptr"]) - 1  # mini-requests per launch
        self.max_pages = max_pages  # CSR pages of one launch in the densest layer


class FlashInferContext:
    """A FlashInfer prefill wrapper and the step plan it holds.

    One per executor, i.e. per metadata builder: every KV-cache group's builder plans its own
    steps, and a group's plan must survive the other groups' plans. Buffers: the wrapper's
    int workspace (8 MiB, where the plan lives) and its pinned host copy, and a small float
    workspace, which fa2 touches only for split-kv partial results (disabled here). The first
    context of a device is made in vLLM's memory-profiling pass (``reserve``, from
    ``ScratchPool``), so the profiler counts it.
    """

    FLOAT_WORKSPACE_BYTES = 16 << 20
    # The wrapper attributes run() hands to the kernel (prefill.py:2496-2498); rebound per layer.
    _RUN_BUFFERS = ("_paged_kv_indptr_buf", "_paged_kv_indices_buf", "_paged_kv_last_page_len_buf")
    _spare: dict[torch.device, FlashInferContext] = {}
    _made: set[torch.device] = set()

    def __init__(self, device: torch.device):
        import flashinfer

        self.device = device
        self.workspace = torch.empty(self.FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                      backend="fa2")
        missing = [a for a in self._RUN_BUFFERS if not hasattr(self.wrapper, a)]
        if missing:
            raise RuntimeError(f"flashinfer {flashinfer.__version__}: BatchPrefillWithPagedKVCacheWrapper "
                               f"has no {missing}; the XATTN FlashInfer executor is written for 0.6.14")
        self._no_indices = torch.zeros(1, dtype=torch.int32, device=device)  # replaced per layer
        self.current: FlashInferStep | None = None
        self._plan_copied: torch.cuda.Event | None = None

    @staticmethod
    def _device(device) -> torch.device:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    @classmethod
    def reserve(cls, device, *, dtype: torch.dtype, head_dim: int, page_size: int) -> None:
        """Profiling pass: make the device's first context now (counted by vLLM's profiler)
        and build / load the fa2 module now (a JIT compile can take a minute), not mid-serving.
        A no-op once an executor has a context (its first plan built the module)."""
        device = cls._device(device)
        if device in cls._made:
            return
        cls._made.add(device)
        ctx = cls._spare[device] = cls(device)
        one = torch.tensor([0, 1], dtype=torch.int32)
        ctx.plan(FlashInferStep(ctx, _plan_args(one, one, torch.ones(1, dtype=torch.int32), group=1,
                                                head_dim=head_dim, page_size=page_size, q_dtype=dtype,
                                                kv_dtype=dtype, max_q=1), 1, 1))
        ctx.current = None

    @classmethod
    def take(cls, device) -> FlashInferContext:
        """A context of its own for an executor: the reserved one if still free."""
        device = cls._device(device)
        cls._made.add(device)
        return cls._spare.pop(device, None) or cls(device)

    def plan(self, fs: FlashInferStep) -> None:
        # plan() writes its work list into a pinned host buffer and copies it to the device
        # asynchronously (scheduler.cuh PrefillPlan, cudaMemcpyAsync): wait until the previous
        # plan's copy has run before that buffer is rewritten (normally long done).
        if self._plan_copied is not None:
            self._plan_copied.synchronize()
        self.wrapper.plan(paged_kv_indices=self._no_indices, **fs.plan_args)
        self._plan_copied = torch.cuda.Event()
        self._plan_copied.record()
        self.current = fs


def _plan_args(qo_indptr, kv_indptr, last_page_len, *, group, head_dim, page_size, q_dtype,
               kv_dtype, max_q) -> dict:
    return dict(
        qo_indptr=qo_indptr, paged_kv_indptr=kv_indptr, paged_kv_last_page_len=last_page_len,
        num_qo_heads=group, num_kv_heads=1, head_dim_qk=head_dim, page_size=page_size,
        causal=True,
        # The softmax scale is the layer's: plan with 1 and pass it to run() as q_scale, which
        # fa2 multiplies into sm_scale (prefill.py:2395-2398).
        sm_scale=1.0,
        q_data_type=q_dtype, kv_data_type=kv_dtype, o_data_type=q_dtype, non_blocking=True,
        disable_split_kv=True,  # see the module docstring, point 1
        max_token_per_sequence=max_q,  # skips one O(M) Python max(); used by cudnn/trtllm only
    )


class FlashInferExecutor(_Executor):
    """FlashInfer fa2 paged prefill over CSR page lists: planned once per step, run per layer."""

    name = "flashinfer"
    # The kernel addresses keys as uint32 ``indptr[b] * page_size + position`` with int32 page
    # counts (prefill.cuh:3067-3068), and queries / outputs as uint32 ``indptr[b] * stride``
    # elements (:2971-2976): each launch stays below 2^31 keys and 2^32 query elements,
    # splitting the selection heads into equal chunks when a step is larger (all chunks share
    # one plan: it depends only on qo_indptr, which is the same for every chunk).
    MAX_KEYS_PER_RUN = 2**31 - 1
    MAX_Q_ELEMS_PER_RUN = 2**32 - 1

    def __init__(self, *, num_q_heads: int, head_dim: int, page_size: int, q_dtype: torch.dtype,
                 kv_dtype: torch.dtype):
        self.num_q_heads, self.head_dim, self.page_size = num_q_heads, head_dim, page_size
        self.q_dtype, self.kv_dtype = q_dtype, kv_dtype
        self.ctx: FlashInferContext | None = None  # taken at the first plan

    def plan_step(self, plan, *, selection_heads: int, device) -> FlashInferStep:
        """Host side, once per step: ``plan`` is the step's host (CPU) plan."""
        group = self.num_q_heads // selection_heads
        heads, kv_indptr, last = densest_page_lists(
            plan, selection_heads=selection_heads, page_size=self.page_size,
            max_keys=self.MAX_KEYS_PER_RUN,
            max_heads=self.MAX_Q_ELEMS_PER_RUN // (plan.num_q_tokens * group * self.head_dim))
        args = _plan_args(plan.mini_cu_seqlens_q(heads), kv_indptr, last, group=group, head_dim=self.head_dim,
                          page_size=self.page_size, q_dtype=self.q_dtype, kv_dtype=self.kv_dtype,
                          max_q=plan.block_size)
        if self.ctx is None:
            self.ctx = FlashInferContext.take(device)
        fs = FlashInferStep(self.ctx, args, heads, int(kv_indptr[-1]))
        self.ctx.plan(fs)
        return fs

    def launches(self, q, out, counts, ids, kv_cache, step, pool, *, granularity: str,
                 num_kv_heads: int, scale: float):
        """Per launch (a chunk of selection heads): builds its page lists into the pool's
        buffers, hands them to the wrapper, and yields the kernel call (benchmarks time it
        alone). Launches share the buffers: run each before advancing."""
        fs: FlashInferStep = step.executor_step
        ctx = fs.ctx
        if ctx.current is not fs:
            # This builder planned another step since (e.g. two batches built before either
            # ran): correct, but slow if it alternates.
            logger.warning_once("XATTN flashinfer executor: re-planning a step whose plan was replaced")
            ctx.plan(fs)
        if fs.max_pages > pool.page_table.numel() or fs.num_mini >= pool.fi_indptr.numel():
            raise RuntimeError(f"XATTN scratch too small for this step's FlashInfer page lists "
                               f"({fs.num_mini} lists, {fs.max_pages} pages)")
        k_pages, v_pages, _ = folded_kv_views(kv_cache)
        t = step.plan.num_q_tokens
        nh = fs.heads_per_run
        w = ctx.wrapper
        for h0 in range(0, q.shape[0] // t, nh):
            csr = build_page_csr(counts, ids, step.block_table, kv_cache, step.plan,
                                 granularity=granularity, num_kv_heads=num_kv_heads, heads=(h0, h0 + nh),
                                 indptr=pool.fi_indptr, indices=pool.page_table.view(-1),
                                 last_page_len=pool.fi_last_page_len)
            # This layer's page lists in place of the plan's upper bounds (module docstring, 2).
            w._paged_kv_indptr_buf = csr.indptr
            w._paged_kv_indices_buf = csr.indices
            w._paged_kv_last_page_len_buf = csr.last_page_len
            rows = slice(h0 * t, (h0 + nh) * t)
            yield lambda rows=rows: w.run(q[rows], (k_pages, v_pages), q_scale=scale, out=out[rows],
                                          enable_pdl=False)


def densest_page_lists(plan, *, selection_heads: int, page_size: int, max_keys: int,
                       max_heads: int | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The step's upper-bound page lists for FlashInfer's ``plan()`` (host, CPU int32): every
    causal key of each mini-request's query block, for ``heads`` selection heads per launch,
    the largest divisor of ``selection_heads`` (at most ``max_heads``) whose lists stay within
    ``max_keys`` keys. Returns (heads, kv_indptr [heads * TQB + 1], last_page_len [heads * TQB])."""
    keys = plan.row_causal_keys()
    pages = (keys + page_size - 1) // page_size
    per_head = int(pages.sum()) * page_size
    max_heads = selection_heads if max_heads is None else max_heads
    heads = max((h for h in range(1, min(selection_heads, max_heads) + 1)
                 if selection_heads % h == 0 and h * per_head <= max_keys), default=0)
    if heads == 0:
        raise RuntimeError(f"XATTN flashinfer executor: one head of this step ({per_head} keys) is more "
                           f"than one launch can address ({max_keys} keys); lower max_num_batched_tokens")
    kv_indptr = torch.zeros(heads * len(pages) + 1, dtype=torch.int64)
    torch.cumsum(pages.repeat(heads), 0, out=kv_indptr[1:])
    last = (keys - (pages - 1) * page_size).repeat(heads)
    return heads, kv_indptr.to(torch.int32), last.to(torch.int32)


def make_executor(name: str | None, *, num_q_heads: int, head_dim: int, page_size: int,
                  q_dtype: torch.dtype, kv_dtype: torch.dtype):
    """The executor object for a resolved name (None: no layer can run sparse)."""
    if name == "fa3":
        return FA3
    if name == "flashinfer" and kv_dtype == q_dtype and q_dtype in (torch.float16, torch.bfloat16):
        return FlashInferExecutor(num_q_heads=num_q_heads, head_dim=head_dim, page_size=page_size,
                                  q_dtype=q_dtype, kv_dtype=kv_dtype)
    return None
