"""A contiguous copy of the sparse requests' keys, for the scoring kernel's TMA loads.

The scoring kernel reads, for one offset t of a super-token, keys S tokens apart. In vLLM's
paged cache (16-token pages) those lie one or two per page, so a key tile is no TMA box; in a
token-major copy ``[rows, Hkv * D]`` it is one box of the copy seen as 2-D rows of S tokens.
Copying costs one read and one write of the keys per layer (0.05 ms at 32K tokens on the Llama
layer, 0.19 ms at 128K) and lets the whole tiles' GEMM run 6-14 % faster (S=16 / S=8), so it
pays from a length that ``key_copy_min_len`` gives (``benchmarks/results/scoring_probe15_h100.json``,
``scoring_launch_overhead_h100.json``).

Which requests are copied, and where, is decided on the host with the plan
(``plan_prefill``'s ``key_copy_capacity``, ``key_copy_min_tiles``, ``key_copy_min_len``):
``plan.key_offset[r]`` is request r's first row, -1 where its keys are not copied (its tiles
then all take the masked loads from the cache). A request without context needs no copy where
the caller hands scoring the layer's own keys (``plan_prefill(direct_keys=True)``, the builder):
it reads them at ``plan.direct_key_offset[r]``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .plan import XAttnPlan

Tensor = torch.Tensor

# Row stride of the copy's 2-D view is S * Hkv * D; rows of up to S = 32 tokens stay whole.
KEY_COPY_ALIGN = 32


@triton.jit
def _copy_keys_kernel(kv_ptr, bt_ptr, req_ptr, koff_ptr, out_ptr,
                      s_kp, s_kh, s_kn, s_kd, s_bt,
                      HKV: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, PAGE: tl.constexpr,
                      TOKENS: tl.constexpr):
    r = tl.program_id(0)
    tok = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)
    off = tl.load(koff_ptr + r)
    n = tl.load(req_ptr + 5 * r + 2)
    if (off >= 0) & (tl.program_id(1) * TOKENS < n):
        hd = tl.arange(0, HD)  # (kv head, channel) of a token's row, padded to a power of two
        ok = (tok < n)[:, None] & (hd < HKV * D)[None, :]
        page = tl.load(bt_ptr + r.to(tl.int64) * s_bt + tok // PAGE, mask=tok < n, other=0).to(tl.int64)
        src = (kv_ptr + page[:, None] * s_kp + (hd // D)[None, :] * s_kh + (tok % PAGE)[:, None] * s_kn
               + (hd % D)[None, :] * s_kd)
        dst = out_ptr + (off + tok).to(tl.int64)[:, None] * (HKV * D) + hd[None, :]
        tl.store(dst, tl.load(src, mask=ok), mask=ok)


def key_copy_min_len(stride: int, num_q_heads: int, num_kv_heads: int) -> int:
    """Keys from which copying a request's keys for the TMA path saves GPU time.

    The copy costs one read and write of the keys (4 KB per token on the Llama layer), linear in
    N; the whole tiles' GEMM, quadratic in N, runs ~14 % faster at S=8 and ~6 % at S=16. H100,
    Llama layer (32 / 8 heads), GPU time with the copy against the masked loads alone
    (``benchmarks/results/scoring_launch_overhead_h100.json``): S=8 -8 % at 32K and -14 % at
    128K; S=16 +2 % at 32K and -5 % at 128K. That puts the break-even near 10K keys at S=8 and
    near 40K at S=16 (the gain halves as S doubles: (S/8)^2), scaled by the copy's share per
    query head (4 / the GQA group of the Llama layer)."""
    group = max(1, num_q_heads // num_kv_heads)
    return int(10240 * (stride / 8) ** 2 * 4 / group)


def key_copy_capacity(max_seq_len: int) -> int:
    """Rows of a key copy that holds one request of up to ``max_seq_len`` keys."""
    return -(-max_seq_len // KEY_COPY_ALIGN) * KEY_COPY_ALIGN


def serving_key_copy(stride: int, num_q_heads: int, num_kv_heads: int, max_seq_len: int) -> dict:
    """``plan_prefill``'s key-copy arguments as the XATTN builder passes them: keys copied from
    ``key_copy_min_len``, within room for one ``max_seq_len`` request, and a request without
    context reading the layer's own keys instead (``direct_keys``: forward hands them over)."""
    return dict(key_copy_capacity=key_copy_capacity(max_seq_len),
                key_copy_min_len=key_copy_min_len(stride, num_q_heads, num_kv_heads),
                direct_keys=True)


def tma_device(device, dtype) -> bool:
    """Whether scoring reads whole tiles through TMA on ``device`` for inputs of ``dtype``: Hopper
    or newer with 16-bit inputs (under the Triton interpreter, on CPU, any). Called per layer:
    the device's capability is looked up once."""
    device = torch.device(device)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device.type == "cuda" and dtype.itemsize == 2 and _major_capability(device.index) >= 9


@functools.lru_cache(maxsize=None)
def _major_capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def key_copy_rows(plan: XAttnPlan) -> int:
    """Rows the plan's key copy needs (a multiple of ``KEY_COPY_ALIGN``)."""
    return key_copy_capacity(plan.key_copy_rows)


def copy_keys(kv_cache: Tensor, block_table: Tensor, plan: XAttnPlan, out: Tensor | None = None) -> Tensor:
    """Keys ``[0, N)`` of every request with ``plan.key_offset[r] >= 0`` into rows
    ``key_offset[r] + j`` of ``out`` (``[rows, Hkv * D]``, the cache's dtype; allocated with
    ``key_copy_rows(plan)`` rows if None). kv_cache: vLLM's logical ``(num_pages, Hkv,
    page_size, 2*D)`` view; plan on the device. No host synchronisation."""
    _, hkv, page, two_d = kv_cache.shape
    d = two_d // 2
    if out is None:
        out = torch.empty(max(key_copy_rows(plan), KEY_COPY_ALIGN), hkv * d, dtype=kv_cache.dtype,
                          device=kv_cache.device)
    elif out.shape[0] < plan.key_copy_rows or out.shape[1] != hkv * d or not out.is_contiguous():
        raise ValueError(f"key copy must be contiguous [>= {plan.key_copy_rows}, {hkv * d}], got {tuple(out.shape)}")
    hd = triton.next_power_of_2(hkv * d)
    tokens = max(1, min(64, 16384 // hd))  # 16K elements per program
    max_n = plan.max_kb * plan.block_size
    _copy_keys_kernel[(plan.num_requests, triton.cdiv(max_n, tokens))](
        kv_cache, block_table, plan.req_meta, plan.key_offset, out,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_table.stride(0),
        HKV=hkv, D=d, HD=hd, PAGE=page, TOKENS=tokens, num_warps=4)
    return out
