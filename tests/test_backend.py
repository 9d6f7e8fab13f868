"""The backend classes: inherited FA layout, CUDA-graph support, dense-only layers."""
import pytest
import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

from vllm_xattn.backends.xattn import (
    XAttentionBackend,
    XAttentionImpl,
    XAttentionMetadataBuilder,
    dense_only_reasons,
)


def test_kv_layout_is_flash_attn():
    args = (100, 16, 8, 128)
    assert XAttentionBackend.get_kv_cache_shape(*args) == FlashAttentionBackend.get_kv_cache_shape(*args)
    # The stride order is inherited, not overridden (its value needs a live config).
    assert "get_kv_cache_stride_order" not in XAttentionBackend.__dict__
    assert "do_kv_cache_update" not in XAttentionImpl.__dict__
    assert XAttentionBackend.get_impl_cls() is XAttentionImpl
    assert XAttentionBackend.get_builder_cls() is XAttentionMetadataBuilder


def test_full_cuda_graphs_only_for_uniform_batches():
    assert XAttentionMetadataBuilder.get_cudagraph_support(None, None) is AttentionCGSupport.UNIFORM_BATCH


def _impl(**kw):
    base = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    base.update(kw)
    return XAttentionImpl(**base)


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({}, None),
        ({"sliding_window": 4096}, "sliding window"),
        ({"logits_soft_cap": 30.0}, "logits soft-cap"),
        ({"alibi_slopes": [0.5] * 8}, "ALiBi"),
        ({"attn_type": AttentionType.ENCODER_ONLY}, "attention type"),
        ({"attn_type": AttentionType.ENCODER_DECODER}, "attention type"),
        ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"}, "KV sharing"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype fp8"),
    ],
)
def test_dense_only_layers_recorded(kw, reason):
    try:
        impl = _impl(**kw)
    except AssertionError as e:  # FA impl refuses some combos without a GPU (e.g. sinks)
        pytest.skip(str(e))
    if reason is None:
        assert impl.dense_reasons == [] and impl.may_run_sparse
    else:
        assert any(reason in r for r in impl.dense_reasons) and not impl.may_run_sparse


def test_sinks_reason_without_constructing_fa():
    reasons = dense_only_reasons(alibi_slopes=None, sliding_window=None, logits_soft_cap=None,
                                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                                 sinks=torch.zeros(8))
    assert reasons == ["attention sinks"]
