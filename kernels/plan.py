"""Host-side plan: everything the kernels need that depends only on batch metadata.

Built once per scheduler step from CPU ints (query_start_loc_cpu, seq_lens_cpu), copied to the
device once with ``plan.to(device)``; the kernel wrappers then launch without host syncs.

Conventions (same as vllm_xattn.reference): request r owns query rows
``cu_seqlens_q[r]:cu_seqlens_q[r+1]`` (Tq rows) and N keys; ctx = N - Tq; blocks of B at
absolute positions; query blocks qb0 = ctx // B .. last = (N-1) // B. Rows of the packed
score / selection tensors are (request, query block) pairs, request r's starting at
``q_block_offset[r]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

Tensor = torch.Tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, Tensor) else x)]


def host_to_device(tensors: list[Tensor | None], device) -> list[Tensor | None]:
    """Small int32 host tensors on ``device``, in one copy staged through pinned memory.

    vLLM's async scheduling builds step N+1's metadata while the GPU still runs step N, so the
    copy must not wait for the stream. CUDA only promises that for pinned memory (a pageable
    ``cudaMemcpyAsync`` "might be synchronous"); on the H100 a 16 KB pageable copy did not wait
    either (benchmarks/results/logs/pageable_vs_pinned_copy_h100.log), and served TTFT did not
    change measurably, so this is one launch instead of ~9 and a guarantee, not a speedup.
    Segments start at 16-byte offsets so that Triton, which specialises kernels on pointer
    alignment, sees one alignment for every step. None entries stay None.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return [None if t is None else t.to(device) for t in tensors]
    if any(t is not None and t.dtype != torch.int32 for t in tensors):
        raise TypeError("host_to_device copies int32 tensors only")
    parts, offsets, total = [], [], 0
    for t in tensors:
        offsets.append(total)
        if t is not None:
            pad = -t.numel() % 4  # 4 x int32 = 16 bytes
            parts += [t.reshape(-1), torch.zeros(pad, dtype=torch.int32)]
            total += t.numel() + pad
    staged = torch.cat(parts).pin_memory() if parts else torch.empty(0, dtype=torch.int32)
    flat = staged.to(device, non_blocking=True)  # the host block is freed after the copy (event)
    return [None if t is None else flat[o : o + t.numel()].view(t.shape)
            for t, o in zip(tensors, offsets)]


@dataclass(frozen=True)
class XAttnPlan:
    # Scoring tiles tuned on the H100 (benchmarks/results/scoring_tune_h100_checks.json): 128 x 256
    # super-token tiles load the fewest bytes from L2 per FLOP that still fit 4 stages.
    DEFAULT_BLOCK_M: ClassVar[int] = 128
    DEFAULT_BLOCK_N: ClassVar[int] = 256

    block_size: int
    stride: int
    block_m: int  # scoring: super-rows per work tile
    block_n: int  # scoring: super-columns per key tile
    num_requests: int
    num_q_tokens: int  # T = rows of q covered by the plan
    total_q_blocks: int  # packed rows
    max_kb: int  # columns of the packed score tensor (max key blocks of a request)
    max_key_tiles: int  # longest causal key loop of any scoring tile
    num_tiles: int  # scoring tiles (work items per query head)
    q_block_offset: tuple[int, ...]
    # int32 tensors (CPU until .to(device))
    req_meta: Tensor  # [R, 5]: q_start, ctx, N, qb0, q_block_offset
    tiles: Tensor  # [num_tiles, 2]: request, first super-row (absolute); longest first
    row_block: Tensor  # [TQB] absolute query block i of each packed row
    row_request: Tensor  # [TQB]
    row_q_start: Tensor  # [TQB + 1] first query row (relative to q) of each packed row's block; last = T
    row_last_len: Tensor  # [TQB] keys of the diagonal block up to the block's last query: min(B, N - i*B)
    # The scoring kernel's contiguous key copy (key_copy.py): first row of each request's keys,
    # -1 for a request that is not copied, and the rows in use.
    key_offset: Tensor  # [R]
    # Or, where scoring is given the step's own keys (``antidiagonal_scores_paged(keys=)``): the
    # first key row of each request with no context (its keys are its query tokens' keys: the
    # request's first query row), -1 for the others; and how many requests have one.
    direct_key_offset: Tensor  # [R]
    key_copy_rows: int = 0
    direct_key_requests: int = 0

    def to(self, device, *extra: Tensor | None) -> "XAttnPlan" | tuple:
        """The plan with its tensors on ``device``, in one copy (``host_to_device``). Host
        tensors in ``extra`` (None passes through) ride along in the same copy; then the
        result is ``(plan, *extra_on_device)``."""
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]
        moved = host_to_device([getattr(self, n) for n in names] + list(extra), device)
        plan = replace(self, **dict(zip(names, moved)))
        return (plan, *moved[len(names):]) if extra else plan

    def causal_blocks(self) -> int:
        """Causal (query block, key block) pairs per head: the denominator of the density
        (syncs if the plan is on the device)."""
        return int((self.row_block.to(torch.int64) + 1).sum())

    def row_causal_keys(self) -> Tensor:
        """int64 [TQB] on the host: keys of every causal block of each packed row up to its
        block's last query (the densest mini-request's key count)."""
        return self.row_block.cpu().to(torch.int64) * self.block_size + self.row_last_len.cpu().to(torch.int64)

    def mini_cu_seqlens_q(self, num_heads: int) -> Tensor:
        """cu_seqlens_q [num_heads * TQB + 1] of mini-requests ordered (head, packed row), for a
        query laid out head-major ``(num_heads * T, G, D)`` (see ``query_index``)."""
        return self._mini_starts(num_heads, torch.arange(self.total_q_blocks))

    def _mini_starts(self, num_heads: int, order: Tensor) -> Tensor:
        """int32 [num_heads * TQB + 1]: query offset of each mini-request (head h's packed rows
        in ``order``) in the head-major layout, then the total rows num_heads * T."""
        rs = self.row_q_start.cpu().to(torch.int64)
        t = self.num_q_tokens
        starts = (torch.arange(num_heads)[:, None] * t + rs[:-1][order][None, :]).reshape(-1)
        return torch.cat([starts, torch.tensor([num_heads * t])]).to(torch.int32)

    def mini_requests_longest_first(self, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
        """The same mini-requests and head-major query as ``mini_cu_seqlens_q``, ordered per
        head by causal keys, most first. FA3's varlen scheduler hands out tiles in batch
        order, so ascending rows left each head's longest mini-requests for last
        (benchmarks/results/executor_order_h100.json). Host int32 tensors: ``row_pos`` [TQB]
        (position of each packed row within its head), ``starts`` [num_heads * TQB + 1] (query
        offset of each mini-request, unsorted; last = num_heads * T) and ``seqused_q``
        [num_heads * TQB] (its query rows): FA3 reads the offsets from cu_seqlens_q and the
        lengths from seqused_q."""
        rs = self.row_q_start.cpu().to(torch.int64)
        order = torch.sort(self.row_causal_keys(), descending=True, stable=True).indices
        row_pos = torch.empty_like(order)
        row_pos[order] = torch.arange(order.numel())
        seqused_q = (rs[1:] - rs[:-1])[order].repeat(num_heads)
        return row_pos.to(torch.int32), self._mini_starts(num_heads, order), seqused_q.to(torch.int32)

    def query_index(self, num_q_heads: int, group: int = 1) -> Tensor:
        """int64 [num_q_heads * T] indices into ``q.reshape(-1, D)`` (q is [T, Hq, D]) that
        lay q out as ``(Hq/group * T, group, D)``, head-major: mini-request rows contiguous.
        Equivalent to ``q.view(T, Hq/group, group, D).transpose(0, 1)`` (the inverse
        permutation puts the output back)."""
        t = self.num_q_tokens
        hk = num_q_heads // group
        tok = torch.arange(t)[None, :, None]
        head = (torch.arange(hk)[:, None, None] * group + torch.arange(group)[None, None, :])
        return (tok * num_q_heads + head).reshape(-1)


def min_scoring_tiles(num_sms: int, num_q_heads: int) -> int:
    """``plan_prefill``'s ``min_tiles`` for a GPU of ``num_sms`` SMs: the scoring kernel runs
    one work item (tile x query head) per SM at a time, and an item sweeps all its key tiles
    alone, so a step with at most half as many items as SMs (an 8K chunk at stride 32 on the
    Llama layer: 2 tiles x 32 heads on 132 SMs) leaves half the GPU idle. Halving block_m then
    doubles the items; 64-row tiles ran 1.26x slower per FLOP than 128-row ones when the GPU
    was full (benchmarks/results/scoring_tune_h100.json), so halving stops above SMs / 2 items."""
    return num_sms // (2 * num_q_heads) + 1


def scoring_tile_heights(block_size: int, stride: int) -> list[int]:
    """The scoring tile heights (block_m) ``plan_prefill`` picks from, largest first: the
    default, halved down to max(16, B/S) (tiles own whole query blocks)."""
    floor = max(16, block_size // stride)
    heights = [XAttnPlan.DEFAULT_BLOCK_M]
    while heights[-1] // 2 >= floor:
        heights.append(heights[-1] // 2)
    return heights


def plan_prefill(
    cu_seqlens_q,
    seq_lens,
    *,
    block_size: int,
    stride: int,
    block_m: int | None = None,
    block_n: int | None = None,
    min_tiles: int = 0,
    key_copy_capacity: int | None = None,
    key_copy_min_tiles: int = 1,
    key_copy_min_len: int = 0,
    direct_keys: bool = False,
    q_starts=None,
) -> XAttnPlan:
    """Plan a varlen prefill batch. ``cu_seqlens_q`` [R+1] and ``seq_lens`` [R] (total keys N
    per request) are CPU ints. ``block_m``/``block_n`` (scoring tile sizes in super-tokens)
    must be multiples of B/S (so tiles own whole blocks), powers of two and >= 16.
    ``min_tiles``: without an explicit ``block_m``, halve the default while the batch has
    fewer scoring tiles than this (see ``min_scoring_tiles``).

    ``key_copy_capacity``: rows of the scoring kernel's key copy (None: unbounded). A request's
    keys are copied if it has at least ``key_copy_min_tiles`` whole scoring tiles (every row's
    S tokens inside its query) and ``key_copy_min_len`` keys, longest request first while the
    copy has room (``key_copy_min_len``: see ``key_copy.key_copy_min_len``). ``direct_keys``: the
    caller hands scoring the step's own keys, which a request without context reads instead of a
    copy (``direct_key_offset``), so such a request is copied only in a step that copies a request
    with context anyway (one key source per launch).

    ``q_starts`` [R]: where each request's query rows start in the query scoring reads, if not
    packed as ``cu_seqlens_q`` says (the backend's sparse requests with stock requests between
    them); ``row_q_start`` and the executors' head-major query stay packed."""
    B, S = block_size, stride
    if B % S:
        raise ValueError(f"stride {S} must divide block_size {B}")
    bps = B // S
    cq, ns = _ints(cu_seqlens_q), _ints(seq_lens)
    R = len(ns)
    if len(cq) != R + 1:
        raise ValueError("cu_seqlens_q must have len(seq_lens) + 1 entries")
    qs = [x - cq[0] for x in cq[:-1]] if q_starts is None else _ints(q_starts)
    if len(qs) != R:
        raise ValueError("q_starts must have one entry per request")
    if block_m is None:
        heights = scoring_tile_heights(B, S)
        block_m = heights[0]
        # super-rows of whole query blocks per request -> tiles of block_m
        rows = [((n - 1) // B - (n - (cq[r + 1] - cq[r])) // B + 1) * bps for r, n in enumerate(ns)]
        for smaller in heights[1:]:
            if sum(_cdiv(x, block_m) for x in rows) >= min_tiles:
                break
            block_m = smaller
    block_n = block_n or XAttnPlan.DEFAULT_BLOCK_N
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v % bps or v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 and a multiple of B/S={bps}")
    req, tiles, costs, whole = [], [], [], [0] * R
    row_block, row_request, row_q_start, row_last_len = [], [], [], []
    off, max_kb = 0, 1
    for r in range(R):
        tq, n = cq[r + 1] - cq[r], ns[r]
        if not 1 <= tq <= n:
            raise ValueError(f"request {r}: need 1 <= query length ({tq}) <= seq_len ({n})")
        ctx = n - tq
        qb0, last = ctx // B, (n - 1) // B
        n_qb = last - qb0 + 1
        max_kb = max(max_kb, last + 1)
        req.append([qs[r], ctx, n, qb0, off])
        for i in range(qb0, last + 1):
            row_block.append(i)
            row_request.append(r)
            row_q_start.append(cq[r] - cq[0] + max(i * B, ctx) - ctx)
            row_last_len.append(min(B, n - i * B))
        a_last = (n - 1) // S
        for a0 in range(qb0 * bps, (last + 1) * bps, block_m):
            tiles.append([r, a0])
            whole[r] += a0 * S >= ctx and (a0 + block_m) * S <= n
            costs.append(min(a0 + block_m - 1, a_last) // block_n + 1)  # causal key tiles
        off += n_qb
    order = sorted(range(len(tiles)), key=lambda t: -costs[t])  # longest first: balance
    key_offset, rows = [-1] * R, 0
    copied = [r for r in sorted(range(R), key=lambda r: -ns[r])
              if whole[r] >= key_copy_min_tiles and ns[r] >= key_copy_min_len]
    if direct_keys and all(req[r][1] == 0 for r in copied):
        copied = []
    for r in copied:
        if key_copy_capacity is None or rows + ns[r] <= key_copy_capacity:
            key_offset[r], rows = rows, rows + ns[r]
    # Direct keys need no copy, so any request with a whole tile (query rows and a key tile) gains.
    # The step's keys are laid out like the query scoring reads: the request's first row q_start.
    direct = [req[r][0] if req[r][1] == 0 and whole[r] and ns[r] >= block_n * S else -1 for r in range(R)]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    return XAttnPlan(
        block_size=B, stride=S, block_m=block_m, block_n=block_n,
        num_requests=R, num_q_tokens=cq[-1] - cq[0], total_q_blocks=off, max_kb=max_kb,
        max_key_tiles=max(costs), num_tiles=len(tiles), q_block_offset=tuple(x[4] for x in req),
        req_meta=i32(req).reshape(R, 5), tiles=i32([tiles[t] for t in order]).reshape(-1, 2),
        row_block=i32(row_block), row_request=i32(row_request),
        row_q_start=i32(row_q_start + [cq[-1] - cq[0]]), row_last_len=i32(row_last_len),
        key_offset=i32(key_offset), direct_key_offset=i32(direct), key_copy_rows=rows,
        direct_key_requests=sum(x >= 0 for x in direct),
    )
