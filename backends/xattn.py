"""The ``XATTN`` attention backend: FLASH_ATTN plus XAttention sparse prefill.

Built on vLLM's FLASH_ATTN backend: the KV-cache shape, stride order and cache
writes (``do_kv_cache_update``) are inherited unchanged, so decode tokens and
short prefills run exactly the stock FlashAttention code.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from vllm_xattn.config import XAttnConfig, xattn_config_from_vllm

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

    @property
    def may_run_sparse(self) -> bool:
        return not self.dense_reasons

    # forward(): inherited. Every token takes the stock FlashAttention path until
    # the sparse prefill path lands (see the README's status section).
