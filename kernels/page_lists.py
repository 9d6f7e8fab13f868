"""Selection -> inputs of a varlen paged executor (FA3 ``flash_attn_varlen_func`` with
``block_table``/``seqused_k``), on the device, no host sync (DESIGN.md section 3).

Mini-request m = (selection head hs, packed row) with m = hs * TQB + row: hs is the query
head (granularity "head") or the kv head (granularity "kv_group"). Its page list is, for each
selected key block in order (diagonal last), the pages covering [j*B, (j+1)*B), each page id
folded with the kv head (``page * Spp + h_kv``, see ``paged.folded_kv_views``). Its key length
is ``(count-1)*B + (last query position of the block + 1 - i*B)``, so the diagonal block ends at
the block's last query token and FA3's bottom-right causal alignment is exact, also with
context before the chunk and partial blocks.

``build_page_csr`` writes the same page lists compactly (CSR: indptr / indices / last_page_len)
for FlashInfer's paged prefill, whose kernel derives each mini-request's key length from
``indptr`` and ``last_page_len`` (``(pages - 1) * page_size + last_page_len``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import XAttnPlan

Tensor = torch.Tensor


@dataclass
class PageLists:
    page_table: Tensor  # int32 [M, max_kb * B // page_size] folded page ids; entries past seqused_k undefined
    seqused_k: Tensor  # int32 [M]
    cu_seqlens_q: Tensor  # int32 [M + 1], query laid out (Hs * T, G, D) head-major (plan.query_index)
    max_seqlen_q: int
    max_seqlen_k: int
    # int32 [M] query rows per mini-request when the order is not the layout's
    # (plan.mini_requests_longest_first): cu_seqlens_q then holds unsorted starts.
    seqused_q: Tensor | None = None


@dataclass
class PageCSR:
    indptr: Tensor  # int32 [M + 1]: mini-request m owns indices[indptr[m]:indptr[m+1]]
    indices: Tensor  # int32 flat buffer of folded page ids (entries past indptr[M] undefined)
    last_page_len: Tensor  # int32 [M], 1..page_size: keys used in each list's last page


# Per-step ints and strides are not specialised on: no recompiles for new batch shapes; nor
# is the block table's row stride (see scoring.py).
@triton.jit(do_not_specialize=["tqb", "h_first", "s_ch", "s_ih", "s_ir", "s_bt"])
def _page_list_kernel(
    cnt_ptr, ids_ptr, bt_ptr, row_req_ptr, row_last_len_ptr, req_ptr, pt_ptr, sk_ptr, indptr_ptr,
    row_pos_ptr, tqb, spp, head_div, h_first,
    s_ch, s_ih, s_ir, s_bt, s_pt,
    B: tl.constexpr, PAGE: tl.constexpr, BLOCK_S: tl.constexpr, CSR: tl.constexpr,
    PERMUTE: tl.constexpr,
):
    PPB: tl.constexpr = B // PAGE  # pages per block
    row = tl.program_id(0)
    hl = tl.program_id(1)  # head within the chunk
    hs = h_first + hl
    c = tl.load(cnt_ptr + hs * s_ch + row)
    r = tl.load(row_req_ptr + row)
    n = tl.load(req_ptr + 5 * r + 2)
    h_kv = hs // head_div
    if PERMUTE:  # the row's position within its head's mini-requests
        m = hl.to(tl.int64) * tqb + tl.load(row_pos_ptr + row)
    else:
        m = hl.to(tl.int64) * tqb + row
    n_pages = (n + PAGE - 1) // PAGE
    offs_s = tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, PPB)
    ids_row = ids_ptr + hs.to(tl.int64) * s_ih + row.to(tl.int64) * s_ir
    bt_row = bt_ptr + r.to(tl.int64) * s_bt
    if CSR:
        # Rows are packed back to back: the diagonal block (last) must stop at the list's
        # last page, or its tail would overwrite the next mini-request's first pages.
        start = tl.load(indptr_ptr + m)
        row_pages = tl.load(indptr_ptr + m + 1) - start
        pt_row = pt_ptr + start.to(tl.int64)
    else:
        tl.store(sk_ptr + m, (c - 1) * B + tl.load(row_last_len_ptr + row))
        row_pages = c * PPB
        pt_row = pt_ptr + m * s_pt
    for s0 in range(0, c, BLOCK_S):
        slot = s0 + offs_s
        smask = slot < c
        jb = tl.load(ids_row + slot, mask=smask, other=0)
        pg = jb[:, None] * PPB + offs_p[None, :]
        # Pages past the request's end (tail of the diagonal block) are never read: write 0-page ids.
        phys = tl.load(bt_row + pg, mask=smask[:, None] & (pg < n_pages), other=0)
        col = slot[:, None] * PPB + offs_p[None, :]
        tl.store(pt_row + col, phys * spp + h_kv, mask=smask[:, None] & (col < row_pages))


# One program walks all mini-requests of the chunk in order (a running prefix sum); M is a few
# thousand, so this is one short launch instead of a chain of torch ops.
@triton.jit(do_not_specialize=["tqb", "n_mini", "h_first", "s_ch"])
def _csr_lengths_kernel(
    cnt_ptr, row_last_len_ptr, indptr_ptr, last_ptr,
    tqb, n_mini, h_first, s_ch,
    B: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    tl.store(indptr_ptr, 0)
    carry = tl.zeros([], dtype=tl.int32)
    for m0 in range(0, n_mini, BLOCK):
        m = m0 + tl.arange(0, BLOCK)
        ok = m < n_mini
        row = m % tqb
        c = tl.load(cnt_ptr + (h_first + m // tqb) * s_ch + row, mask=ok, other=1)
        keys = (c - 1) * B + tl.load(row_last_len_ptr + row, mask=ok, other=1)
        pages = tl.where(ok, (keys + PAGE - 1) // PAGE, 0)
        tl.store(indptr_ptr + 1 + m, carry + tl.cumsum(pages, 0), mask=ok)
        tl.store(last_ptr + m, keys - (pages - 1) * PAGE, mask=ok)
        carry += tl.sum(pages, 0)


def build_page_lists(
    counts: Tensor,
    ids: Tensor,
    block_table: Tensor,
    kv_cache: Tensor,
    plan: XAttnPlan,
    *,
    granularity: str = "head",
    num_kv_heads: int | None = None,
    heads: tuple[int, int] | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    row_pos: Tensor | None = None,
    seqused_q: Tensor | None = None,
    num_warps: int = 1,
) -> PageLists:
    """counts [Hq, TQB] / ids [Hq, TQB, max_kb] from ``select_blocks_packed`` (for
    "kv_group" the group's repeated rows are read once), block_table int32 [R, max_pages] of
    the plan's requests, kv_cache the logical ``(num_pages, Hkv, page_size, 2D)`` view.

    The page table is sized for the densest case (every causal block): max_kb * B/page_size
    columns per mini-request (1 GiB for 32 heads at 128K, page 16). To bound it, build and run
    the executor per chunk of selection heads ``heads=(h0, h1)`` (query heads for "head", kv
    heads for "kv_group"), optionally into a reused ``page_table`` buffer; mini-request m of a
    chunk is (head h0 + m // TQB, row m % TQB) and its queries are rows ``h0*T : h1*T`` of the
    head-major query layout.
    ``cu_seqlens_q``: the mini-requests' query offsets for all heads, precomputed once per
    step (``plan.mini_cu_seqlens_q`` on the host plan, copied to the device); saves the small
    device ops that derive it here in every layer.
    ``row_pos`` / ``seqused_q`` (with ``cu_seqlens_q``, all heads): another mini-request order,
    from ``plan.mini_requests_longest_first`` (device copies): the row of packed row r and head
    h is ``h * TQB + row_pos[r]``.
    ``num_warps``: warps per mini-request's program (timed in ``scripts/bench_selection.py``).
    """
    sel = _Selection(counts, ids, block_table, kv_cache, plan, granularity, num_kv_heads, heads)
    counts, ids, tqb, max_kb, ppb = sel.counts, sel.ids, sel.tqb, sel.max_kb, sel.ppb
    if row_pos is not None and (seqused_q is None or cu_seqlens_q is None or heads is not None):
        raise ValueError("row_pos needs seqused_q and cu_seqlens_q, for all heads")
    dev = ids.device
    nh = sel.h1 - sel.h0
    m = nh * tqb
    if page_table is None:
        page_table = torch.empty(m, max_kb * ppb, dtype=torch.int32, device=dev)
    elif page_table.shape[0] < m or page_table.shape[1] < max_kb * ppb or page_table.stride(1) != 1:
        raise ValueError(f"page_table buffer must be int32 with >= ({m}, {max_kb * ppb}) and contiguous rows")
    else:
        page_table = page_table[:m]
    seqused_k = torch.empty(m, dtype=torch.int32, device=dev)
    _page_list_kernel[(tqb, nh)](
        counts, ids, block_table, plan.row_request, plan.row_last_len, plan.req_meta, page_table, seqused_k,
        seqused_k, seqused_k if row_pos is None else row_pos, tqb, sel.spp, sel.head_div, sel.h0,
        counts.stride(0), ids.stride(0), ids.stride(1), block_table.stride(0), page_table.stride(0),
        B=plan.block_size, PAGE=sel.page, BLOCK_S=64, CSR=False, PERMUTE=row_pos is not None, num_warps=num_warps,
    )
    B = plan.block_size
    if cu_seqlens_q is not None and heads is None:
        return PageLists(page_table, seqused_k, cu_seqlens_q, max_seqlen_q=B, max_seqlen_k=max_kb * B,
                         seqused_q=seqused_q if row_pos is not None else None)
    # Mini-request query rows: head-major copies of the plan's block rows (device math, no sync).
    rs = plan.row_q_start
    t = plan.num_q_tokens
    cu = (torch.arange(nh, device=dev, dtype=torch.int32)[:, None] * t + rs[None, :-1]).reshape(-1)
    cu = torch.cat([cu, torch.full((1,), nh * t, dtype=torch.int32, device=dev)])
    return PageLists(page_table, seqused_k, cu, max_seqlen_q=B, max_seqlen_k=max_kb * B)


def build_page_csr(
    counts: Tensor,
    ids: Tensor,
    block_table: Tensor,
    kv_cache: Tensor,
    plan: XAttnPlan,
    *,
    granularity: str = "head",
    num_kv_heads: int | None = None,
    heads: tuple[int, int] | None = None,
    indptr: Tensor | None = None,
    indices: Tensor | None = None,
    last_page_len: Tensor | None = None,
) -> PageCSR:
    """The page lists of ``build_page_lists`` (same arguments, same mini-request order, same
    page ids), packed as CSR into the given buffers (allocated if None): ``indptr`` int32
    [>= M + 1], ``indices`` flat int32 [>= total pages], ``last_page_len`` int32 [>= M]. Two
    launches, no host sync; ``indices`` must hold the densest case (every causal page of every
    mini-request), which the caller bounds on the host."""
    sel = _Selection(counts, ids, block_table, kv_cache, plan, granularity, num_kv_heads, heads)
    dev = ids.device
    nh = sel.h1 - sel.h0
    m = nh * sel.tqb
    if indptr is None:
        indptr = torch.empty(m + 1, dtype=torch.int32, device=dev)
    if last_page_len is None:
        last_page_len = torch.empty(m, dtype=torch.int32, device=dev)
    if indices is None:
        indices = torch.empty(m * sel.max_kb * sel.ppb, dtype=torch.int32, device=dev)
    for name, buf, need in (("indptr", indptr, m + 1), ("last_page_len", last_page_len, m)):
        if buf.dtype != torch.int32 or buf.dim() != 1 or buf.numel() < need or buf.stride(0) != 1:
            raise ValueError(f"{name} buffer must be contiguous int32 with >= {need} entries")
    if indices.dtype != torch.int32 or indices.dim() != 1 or indices.stride(0) != 1:
        raise ValueError("indices buffer must be a contiguous 1-D int32 tensor")
    indptr, last_page_len = indptr[: m + 1], last_page_len[:m]
    _csr_lengths_kernel[(1,)](
        sel.counts, plan.row_last_len, indptr, last_page_len,
        sel.tqb, m, sel.h0, sel.counts.stride(0),
        B=plan.block_size, PAGE=sel.page, BLOCK=1024, num_warps=4,
    )
    _page_list_kernel[(sel.tqb, nh)](
        sel.counts, sel.ids, block_table, plan.row_request, plan.row_last_len, plan.req_meta, indices,
        last_page_len, indptr, indptr, sel.tqb, sel.spp, sel.head_div, sel.h0,
        sel.counts.stride(0), sel.ids.stride(0), sel.ids.stride(1), block_table.stride(0), 0,
        B=plan.block_size, PAGE=sel.page, BLOCK_S=64, CSR=True, PERMUTE=False, num_warps=1,
    )
    return PageCSR(indptr, indices, last_page_len)


class _Selection:
    """Checked views of a selection for the page-list kernels: the rows of the selection
    heads (query heads, or one per KV group), the head range and the cache's page geometry."""

    def __init__(self, counts, ids, block_table, kv_cache, plan, granularity, num_kv_heads, heads):
        hq, self.tqb, self.max_kb = ids.shape
        _, hkv, self.page, _ = kv_cache.shape
        B = plan.block_size
        if B % self.page:
            raise ValueError(f"page_size {self.page} must divide block_size {B}")
        self.ppb = B // self.page
        s_b, s_h = kv_cache.stride(0), kv_cache.stride(1)
        if s_b % s_h:
            raise ValueError("kv_cache page stride must be a multiple of its head stride")
        self.spp = s_b // s_h
        if granularity == "kv_group":
            hkv = num_kv_heads or hkv
            g = hq // hkv
            counts, ids = counts[::g], ids[::g]  # views: the group's selection, once per kv head
            hs, self.head_div = hkv, 1
        elif granularity == "head":
            hs, self.head_div = hq, hq // hkv
        else:
            raise ValueError(f"granularity must be 'head' or 'kv_group', got {granularity!r}")
        self.counts, self.ids = counts, ids
        self.h0, self.h1 = heads or (0, hs)
        if not 0 <= self.h0 < self.h1 <= hs:
            raise ValueError(f"heads must be a range within [0, {hs}], got {heads!r}")
        if block_table.stride(1) != 1:
            raise ValueError("block_table rows must be contiguous")
