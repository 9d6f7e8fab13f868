"""The ``XATTN`` attention backend: FLASH_ATTN plus XAttention sparse prefill.

Built on vLLM's FLASH_ATTN backend: the KV-cache shape, stride order and cache
writes (``do_kv_cache_update``) are inherited unchanged, so decode tokens and
short prefills run exactly the stock FlashAttention code.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none, get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
from vllm.v1.worker.ubatch_utils import UBatchSlice, split_attn_metadata

from vllm_xattn.backends.density_log import density_log
from vllm_xattn.backends.executors import make_executor, resolve_executor
from vllm_xattn.backends.sparse_prefill import (
    ScratchPool,
    SparsePrefill,
    SparseStep,
    plan_sparse_requests,
)
from vllm_xattn.backends.warmup import warm_up_sparse_path
from vllm_xattn.config import XAttnConfig, load_threshold_table, xattn_config_from_vllm
from vllm_xattn.kernels import min_scoring_tiles, serving_key_copy

# Under the "vllm" logger so messages use vLLM's handlers and log level.
logger = init_logger("vllm.xattn")


def dense_only_reasons(
    *,
    alibi_slopes,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    attn_type: str,
    kv_sharing_target_layer_name: str | None,
    sinks: torch.Tensor | None,
) -> list[str]:
    """Why a layer must always run dense (empty list: it may run sparse).

    XAttention's estimate and block-sparse causal executor assume plain causal
    softmax attention over the layer's own KV cache; anything else is delegated
    to FlashAttention instead of being refused, because an explicitly selected
    backend gets no fallback in vLLM.
    """
    reasons = []
    if alibi_slopes is not None:
        reasons.append("ALiBi")
    if sliding_window is not None:
        reasons.append("sliding window")
    if logits_soft_cap:
        reasons.append("logits soft-cap")
    if sinks is not None:
        reasons.append("attention sinks")
    if attn_type != AttentionType.DECODER:
        reasons.append(f"attention type {attn_type}")  # encoder, encoder-only, cross
    if kv_sharing_target_layer_name is not None:
        reasons.append("KV sharing")
    return reasons


def _capability(device=None) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None


class XAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        # Must be a key of AttentionBackendEnum: the plugin adds it as an alias.
        return "XATTN"

    @staticmethod
    def get_impl_cls() -> type[XAttentionImpl]:
        return XAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[XAttentionMetadataBuilder]:
        return XAttentionMetadataBuilder


@dataclasses.dataclass
class XAttentionMetadata(FlashAttentionMetadata):
    """Stock FA metadata of the whole batch (used as is by dense-only layers), plus the
    split for layers that run sparse: the stock FA segments (first token, end token, FA
    metadata of those requests) and the sparse requests' step."""

    stock: list[tuple[int, int, FlashAttentionMetadata]] = dataclasses.field(default_factory=list)
    sparse: SparseStep | None = None


class XAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    # Full CUDA graphs only for uniform (decode) batches: prefill batches, where
    # the sparse path runs with data-dependent work, always run attention eagerly
    # (piecewise graphs), while decode keeps FA3's full graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.xattn: XAttnConfig = xattn_config_from_vllm(vllm_config)
        logger.info_once("XATTN backend active: %s", str(self.xattn.model_dump(exclude_none=True)))
        name, _ = resolve_executor(self.xattn.executor, fa_version=get_flash_attn_version(head_size=self.headdim),
                                   head_size=self.headdim, capability=_capability(device))
        self.executor = make_executor(name, num_q_heads=self.num_heads_q, head_dim=self.headdim,
                                      page_size=self.block_size, q_dtype=vllm_config.model_config.dtype,
                                      kv_dtype=self.kv_cache_dtype)
        impls = [getattr(l, "impl", None) for l in
                 get_layers_from_vllm_config(vllm_config, torch.nn.Module, layer_names).values()]
        if impls and not any(getattr(i, "may_run_sparse", False) for i in impls):
            self.executor = None  # a dense-only group (e.g. sliding window): plan no executor
        # Scoring tiles shrink in steps too small to occupy the GPU (plan.min_scoring_tiles).
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if torch.device(device).type == "cuda" else 0)
        self._min_tiles = min_scoring_tiles(sms, self.num_heads_q) if sms else 0
        # Scoring copies a request's keys for its TMA loads (kernels/key_copy.py) from the length
        # where that saves GPU time, within room for one max_model_len request; a request without
        # context reads the layer's new keys instead (forward hands them over), no copy.
        self._key_copy = serving_key_copy(self.xattn.stride, self.num_heads_q, self.num_heads_kv,
                                          vllm_config.model_config.max_model_len)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FlashAttentionMetadata:
        cm = common_attn_metadata
        if (log := density_log()) is not None:
            log.flush()  # the previous step's layers are enqueued: copy their counts (no sync)
        split = None
        if (cm.causal is True and not fast_build and self.dcp_world_size == 1
                and cm.seq_lens_cpu_upper_bound is not None and cm.max_query_len >= self.xattn.block_size
                and self.xattn.block_size % self.block_size == 0):
            # CPU copies only: no device sync. Upper bounds are exact for prefill rows.
            split = plan_sparse_requests(cm.query_start_loc_cpu[: cm.num_reqs + 1],
                                         cm.seq_lens_cpu_upper_bound[: cm.num_reqs], self.xattn,
                                         min_tiles=self._min_tiles, **self._key_copy)
        if split is None:
            return super().build(common_prefix_len, cm, fast_build)
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        stock = []
        for a, b in split.stock:  # decodes, short prefills: stock FA on their own metadata
            sub = split_attn_metadata([UBatchSlice(slice(a, b), slice(qsl[a], qsl[b]))], cm)[0]
            md = super().build(0, sub, fast_build)
            if md.scheduler_metadata is not None:
                # A view of a buffer the next build() overwrites; these batches are never
                # captured in full CUDA graphs, so a private copy is safe.
                md.scheduler_metadata = md.scheduler_metadata.clone()
            stock.append((qsl[a], qsl[b], md))
        full = super().build(common_prefix_len, cm, fast_build)
        step = SparseStep.from_split(
            split, block_table=cm.block_table_tensor, device=self.device, executor=self.executor,
            selection_heads=self.xattn.selection_heads(self.num_heads_q, self.num_heads_kv))
        return XAttentionMetadata(
            **{f.name: getattr(full, f.name) for f in dataclasses.fields(FlashAttentionMetadata)},
            stock=stock, sparse=step)


class XAttentionImpl(FlashAttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: AttentionType = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )
        vllm_config = get_current_vllm_config_or_none()
        self.xattn: XAttnConfig = xattn_config_from_vllm(vllm_config)
        self.dense_reasons: list[str] = dense_only_reasons(
            alibi_slopes=alibi_slopes,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
            attn_type=attn_type,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
            sinks=sinks,
        )
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            self.dense_reasons.append(f"kv_cache_dtype {kv_cache_dtype}")
        self.executor, why = resolve_executor(self.xattn.executor, fa_version=self.vllm_flash_attn_version,
                                              head_size=head_size, capability=_capability())
        if why:
            self.dense_reasons.append(why)
        if head_size % 16:
            self.dense_reasons.append(f"head_size {head_size} (scoring needs a multiple of 16)")
        self._vllm_config = vllm_config
        self._sparse: SparsePrefill | None = None  # set up at the first forward (needs the layer)
        self._layer_checked = False
        self._layer_index: int | None = None
        self._head_offset = 0  # first query head of this tensor-parallel rank (density log)
        self._pool: ScratchPool | None = None  # shared by all layers, see ScratchPool.get

    @property
    def may_run_sparse(self) -> bool:
        return not self.dense_reasons

    def _setup_layer(self, layer: torch.nn.Module, device: torch.device) -> None:
        """Per-layer decisions that need the layer's name: dense_layers, thresholds."""
        from vllm.model_executor.models.utils import extract_layer_index

        self._layer_checked = True
        if not self.may_run_sparse:
            return
        try:
            index = extract_layer_index(layer.layer_name)
        except Exception:
            index = None
        self._layer_index = index
        if index is not None and index < self.xattn.dense_layers:
            self.dense_reasons.append(f"layer {index} < dense_layers")
            return
        tp_rank = 0
        if self._vllm_config is not None and self._vllm_config.parallel_config.tensor_parallel_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        self._head_offset = tp_rank * self.num_heads  # query heads are split evenly over ranks
        thresholds = None
        if self.xattn.threshold_file is not None and self.xattn.selection == "threshold":
            table = load_threshold_table(self.xattn.threshold_file)
            if index is None or index >= len(table) or len(table[0]) < (tp_rank + 1) * self.num_heads:
                raise ValueError(
                    f"threshold_file {self.xattn.threshold_file}: no thresholds for layer {index} "
                    f"with {self.num_heads} query heads per rank (table is {len(table)} x {len(table[0])})")
            row = table[index][tp_rank * self.num_heads : (tp_rank + 1) * self.num_heads]
            thresholds = torch.tensor(row, dtype=torch.float32, device=device)
        self._sparse = SparsePrefill(self.xattn, num_q_heads=self.num_heads,
                                     num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
                                     scale=self.scale, thresholds=thresholds)

    def _scratch(self, query: torch.Tensor) -> ScratchPool:
        """The process's scratch pool; whoever creates it (normally the memory-profiling pass)
        also compiles the sparse path's kernels on it (``warmup.py``)."""
        if self._pool is not None:
            return self._pool
        cfg = self._vllm_config
        page_size = cfg.cache_config.block_size
        self._pool = ScratchPool.get(
            max_tokens=cfg.scheduler_config.max_num_batched_tokens,
            max_reqs=cfg.scheduler_config.max_num_seqs, max_seq_len=cfg.model_config.max_model_len,
            num_q_heads=self.num_heads, head_dim=self.head_size, dtype=query.dtype, cfg=self.xattn,
            page_size=page_size, device=query.device, executor=self.executor, num_kv_heads=self.num_kv_heads)
        if not self._pool.warmed:
            self._pool.warmed = True
            kv_dtype = kv_cache_dtype_str_to_dtype(self.kv_cache_dtype, cfg.model_config)
            executor = make_executor(self.executor, num_q_heads=self.num_heads, head_dim=self.head_size,
                                     page_size=page_size, q_dtype=query.dtype, kv_dtype=kv_dtype)
            warm_up_sparse_path(
                self._sparse, self._pool, query, executor=executor, page_size=page_size, kv_dtype=kv_dtype,
                max_model_len=cfg.model_config.max_model_len,
                selection_heads=self.xattn.selection_heads(self.num_heads, self.num_kv_heads))
        return self._pool

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not self._layer_checked and self._vllm_config is not None and query.is_cuda:
            self._setup_layer(layer, query.device)
        sparse_step = getattr(attn_metadata, "sparse", None)
        if attn_metadata is None:
            # Memory-profiling run (no KV cache yet): reserve the sparse path's scratch now
            # so that vLLM counts it and sizes the KV cache around it.
            if self._sparse is not None:
                self._scratch(query)
        elif sparse_step is not None and self._sparse is not None:
            for a, b, md in attn_metadata.stock:  # the other requests' rows: stock FA
                super().forward(layer, query[a:b], None if key is None else key[a:b],
                                None if value is None else value[a:b], kv_cache, md, output[a:b],
                                output_scale, output_block_scale)
            logger.info_once("XATTN sparse prefill running")
            counts = self._sparse.run(query, kv_cache, sparse_step,
                                      output.view(-1, self.num_heads, self.head_size),
                                      self._scratch(query), keys=key)
            if (log := density_log()) is not None:
                log.record(self._layer_index if self._layer_index is not None else -1,
                           sparse_step.num_tokens, self._head_offset, counts, sparse_step.candidate_blocks)
            return output
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                               output_scale, output_block_scale)
