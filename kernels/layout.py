"""Copies between the token-major query / output layout and the executors' head-major one.

The executors run one mini-request per (selection head, query block) and need its query rows
contiguous: ``(heads, T, group, D)`` instead of vLLM's ``(T, heads * group, D)``. Both sides
are 4-D views of the same logical ``(T, heads, group, D)`` tensor with different strides; a
torch ``copy_`` between them walks elements one by one (1.3 TB/s on the H100 at 128K tokens,
benchmarks/results/profile_layer_llama_128k_ratio0.1_h100.txt). Here each program copies a
tile of BLOCK_T tokens x the group's ``group * D`` values of one selection head, in rows of
contiguous ``D`` elements on both sides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["T", "s_st", "d_st"])
def _copy_tokens_heads_kernel(
    src_ptr, dst_ptr, T,
    s_st, s_sh, s_sg, s_sd,
    d_st, d_sh, d_sg, d_sd,
    GD: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    g, d = c // D, c % D
    mask = (t < T)[:, None] & (c < GD)[None, :]
    t64 = t.to(tl.int64)[:, None]
    x = tl.load(src_ptr + t64 * s_st + h * s_sh + (g * s_sg + d * s_sd)[None, :], mask=mask)
    tl.store(dst_ptr + t64 * d_st + h * d_sh + (g * d_sg + d * d_sd)[None, :], x, mask=mask)


def copy_tokens_heads(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)`` for two 4-D views ``(T, heads, group, D)`` of the same shape and
    dtype on the GPU (any strides; the last dim should be contiguous for speed)."""
    if dst.shape != src.shape or dst.dim() != 4 or dst.dtype != src.dtype:
        raise ValueError(f"need two (T, heads, group, D) views of one shape and dtype, got "
                         f"{tuple(dst.shape)} {dst.dtype} and {tuple(src.shape)} {src.dtype}")
    T, heads, group, d = src.shape
    if T == 0:
        return dst
    block_c = triton.next_power_of_2(group * d)
    # 2048 elements and 2 warps per program: 0.74 ms (2.9 TB/s) for the Llama layer's output at
    # 128K on the H100, vs 0.86 ms with 8192 / 4 warps; tiles of >= 16K elements collapsed to
    # 0.2-0.5 TB/s (benchmarks/results/logs/copy_tune_h100.log).
    block_t = max(1, min(64, 2048 // block_c, triton.next_power_of_2(T)))
    _copy_tokens_heads_kernel[(triton.cdiv(T, block_t), heads)](
        src, dst, T, *src.stride(), *dst.stride(),
        GD=group * d, D=d, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=2,
    )
    return dst
