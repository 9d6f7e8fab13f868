"""vLLM's paged KV cache as the kernels see it.

vLLM 0.26 FLASH_ATTN / FLASHINFER cache: logical shape ``(num_pages, Hkv, page_size, 2*D)``,
K = ``[..., :D]``, V = ``[..., D:]``; physical order usually NHD (stride order 0, 2, 1, 3).
The kernels take the logical view with arbitrary strides, so nothing here copies the cache.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def split_kv(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Logical K and V views ``(num_pages, Hkv, page_size, D)`` of the cache (no copy)."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(f"kv_cache must be (num_pages, Hkv, page_size, 2*D), got {tuple(kv_cache.shape)}")
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d], kv_cache[..., d:]


def folded_kv_views(kv_cache: Tensor) -> tuple[Tensor, Tensor, int]:
    """K and V as ``(P, page_size, 1, D)`` views whose page id ``p = page * Spp + h_kv``
    addresses KV head ``h_kv`` of physical page ``page`` (DESIGN.md section 3).

    Page ids of different heads overlap in memory; executors (FA3 varlen, FlashInfer) accept
    such views, and it lets every mini-request own a page list over the real cache.
    Returns (k_view, v_view, Spp).
    """
    num_pages, hkv, page_size, two_d = kv_cache.shape
    d = two_d // 2
    s_b, s_h, s_n, s_d = kv_cache.stride()
    if s_d != 1:
        raise ValueError("kv_cache's last dim must be contiguous")
    if s_b % s_h:
        raise ValueError(f"page stride {s_b} is not a multiple of the head stride {s_h}")
    spp = s_b // s_h
    p = (num_pages - 1) * spp + hkv
    off = kv_cache.storage_offset()
    k = kv_cache.as_strided((p, page_size, 1, d), (s_h, s_n, d, 1), off)
    v = kv_cache.as_strided((p, page_size, 1, d), (s_h, s_n, d, 1), off + d)
    return k, v, spp


def make_paged_cache(
    k: Tensor,
    v: Tensor,
    cu_seqlens_k: Tensor,
    page_size: int,
    num_pages_extra: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Test helper: scatter contiguous per-request K/V ``[N_total, Hkv, D]`` into a randomly
    permuted page pool stored physically NHD, like vLLM on H100.

    Returns ``(kv_cache, block_table)``: kv_cache is the logical view
    ``(num_pages, Hkv, page_size, 2D)`` of an NHD-contiguous buffer; block_table is int32
    ``[R, max_pages]`` (unused entries 0). ``num_pages_extra`` unused pages pad the pool.
    """
    cu = [int(x) for x in torch.as_tensor(cu_seqlens_k).tolist()]
    n_tok, hkv, d = k.shape
    lens = [cu[r + 1] - cu[r] for r in range(len(cu) - 1)]
    n_pages_req = [-(-n // page_size) for n in lens]
    num_pages = sum(n_pages_req) + num_pages_extra
    perm = torch.randperm(num_pages, generator=generator)
    buf = torch.randn(num_pages, page_size, hkv, 2 * d, generator=generator).to(dtype=k.dtype, device=k.device)
    bt = torch.zeros(len(lens), max(n_pages_req), dtype=torch.int32)
    nxt = 0
    for r, n in enumerate(lens):
        for pg in range(n_pages_req[r]):
            phys = int(perm[nxt])
            nxt += 1
            bt[r, pg] = phys
            lo, hi = cu[r] + pg * page_size, min(cu[r] + (pg + 1) * page_size, cu[r + 1])
            buf[phys, : hi - lo, :, :d] = k[lo:hi]
            buf[phys, : hi - lo, :, d:] = v[lo:hi]
    return buf.permute(0, 2, 1, 3), bt.to(k.device)
