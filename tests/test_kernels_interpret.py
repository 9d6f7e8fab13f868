"""Triton kernels (vllm_xattn.kernels) against the PyTorch reference (vllm_xattn.reference).

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors at tiny shapes; the
``gpu``-marked variants run the same checks on CUDA at larger shapes.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged,
    build_page_csr,
    build_page_lists,
    copy_tokens_heads,
    folded_kv_views,
    make_paged_cache,
    masks_from_selection,
    plan_prefill,
    select_blocks_packed,
    unpack_scores,
)
from vllm_xattn.reference import antidiagonal_block_scores, block_sparse_attention, select_blocks  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]

# (reqs [(Tq, N)], Hq, Hkv, D, B, S, page, block_m, block_n). CPU: interpreter-sized.
CPU_CASES = {
    "gqa_ctx_b64_s4_p16": ([(70, 200), (130, 130), (33, 300)], 4, 2, 16, 64, 4, 16, 16, 16),
    "ctx_b64_s8_p64": ([(200, 600), (64, 64)], 2, 1, 32, 64, 8, 64, 16, 32),
    "b128_s16_p32": ([(300, 520)], 2, 2, 16, 128, 16, 32, 16, 16),
    "b64_s16_p16_multi": ([(1, 77), (150, 450), (64, 128)], 4, 1, 16, 64, 16, 16, 16, 16),
    "b128_s4_p16": ([(200, 600), (5, 40)], 2, 1, 32, 128, 4, 16, 32, 32),
    "d48_b64_s32_p16": ([(100, 250), (30, 45)], 2, 1, 48, 64, 32, 16, 16, 16),  # S > page
    "big_tiles_b64_s4_p16": ([(1100, 1500), (40, 300)], 2, 1, 16, 64, 4, 16, 256, 128),  # --tune's 256-row tiles
}
GPU_CASES = {
    "gqa_ctx_b128_s8_p16": ([(1000, 3000), (2048, 2048), (77, 5000)], 8, 2, 128, 128, 8, 16, 64, 64),
    "gqa_b128_s16_p64": ([(4096, 8192), (513, 600)], 8, 1, 128, 128, 16, 64, 128, 64),
    "d64_b64_s4_p16": ([(3000, 4000)], 4, 4, 64, 64, 4, 16, 64, 64),
    "b64_s32_p32": ([(1500, 2500), (10, 70)], 4, 2, 64, 64, 32, 32, 64, 64),
    "d96_b128_s8_p128": ([(700, 1900)], 4, 2, 96, 128, 8, 128, 128, 64),
    "big_tiles_b128_s8_p16": ([(5000, 9000), (300, 700)], 8, 2, 128, 128, 8, 16, 256, 128),
    # the tile min_tiles shrinks to: an 8K chunk after 24K of context at stride 32
    "shrunk_tiles_b128_s32_p16": ([(8192, 32768)], 4, 1, 64, 128, 32, 16, 64, 256),
}


def case_params():
    out = []
    for dev in DEVICES:
        cases = CPU_CASES if dev.values[0] == "cpu" else GPU_CASES
        for name, c in cases.items():
            out.append(pytest.param(dev.values[0], c, id=f"{dev.values[0]}-{name}", marks=dev.marks))
    return out


CASES = case_params()


def make_problem(case, device, seed=0, dtype=torch.float32, qscale=2.0):
    reqs, hq, hkv, d, B, S, page, bm, bn = case
    g = torch.Generator().manual_seed(seed)
    T, N = sum(t for t, _ in reqs), sum(n for _, n in reqs)
    q = (torch.randn(T, hq, d, generator=g) * qscale).to(dtype)
    k = torch.randn(N, hkv, d, generator=g).to(dtype)
    v = torch.randn(N, hkv, d, generator=g).to(dtype)
    cu_q = torch.tensor([0] + np.cumsum([t for t, _ in reqs]).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + np.cumsum([n for _, n in reqs]).tolist(), dtype=torch.int32)
    kv, bt = make_paged_cache(k, v, cu_k, page, num_pages_extra=3, generator=g)
    plan = plan_prefill(cu_q, [n for _, n in reqs], block_size=B, stride=S, block_m=bm, block_n=bn)
    return dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, kv=kv.to(device), bt=bt.to(device), plan=plan.to(device),
                B=B, S=S, hkv=hkv, dev=device)


def pack(scores, plan):
    hq = scores[0].shape[0]
    A = torch.zeros(hq, plan.total_q_blocks, plan.max_kb)
    for r, a in enumerate(scores):
        o = plan.q_block_offset[r]
        A[:, o : o + a.shape[1], : a.shape[2]] = a
    return A


def kernel_scores(p, q=None):
    q = p["q"] if q is None else q
    return antidiagonal_scores_paged(q.to(p["dev"]), p["kv"], p["bt"], p["plan"])


def ref_scores(p):
    return antidiagonal_block_scores(p["q"], p["k"], p["cu_q"], p["cu_k"], stride=p["S"], block_size=p["B"])


# --------------------------------------------------------------------------- plan / paged helpers


def test_scoring_launch_defaults_fit_shared_memory():
    """The default tile keeps the 4-stage pipeline it was tuned with; larger --tune tiles get
    fewer stages (4 would overflow the H100's 227 KB) and 16 warps."""
    from vllm_xattn.kernels.plan import XAttnPlan
    from vllm_xattn.kernels.scoring import _STAGE_SMEM, _default_stages, _default_warps

    bm, bn = XAttnPlan.DEFAULT_BLOCK_M, XAttnPlan.DEFAULT_BLOCK_N
    assert (_default_warps(bm * bn), _default_stages(bm, bn, 64, 2)) == (8, 4)
    assert (_default_warps(256 * 256), _default_stages(256, 256, 64, 2)) == (16, 3)
    for m, n, d in [(256, 256, 64), (128, 256, 128), (64, 512, 64), (16, 16, 16)]:
        st = _default_stages(m, n, d, 2)
        assert 2 <= st <= 4 and (st == 2 or st * (m + n) * d * 2 <= _STAGE_SMEM)


def test_plan_layout():
    plan = plan_prefill([0, 70, 200, 233], [200, 130, 300], block_size=64, stride=4, block_m=16, block_n=16)
    # request 0: ctx 130 -> blocks 2..3; request 1: blocks 0..2; request 2: ctx 267 -> block 4
    assert plan.q_block_offset == (0, 2, 5) and plan.total_q_blocks == 6 and plan.max_kb == 5
    assert plan.row_block.tolist() == [2, 3, 0, 1, 2, 4]
    assert plan.row_q_start.tolist() == [0, 62, 70, 134, 198, 200, 233]
    assert plan.row_last_len.tolist() == [64, 8, 64, 64, 2, 44]
    q = torch.randn(233, 4, 8)
    idx = plan.query_index(4, group=2)
    assert torch.equal(q.reshape(-1, 8)[idx].view(2, 233, 2, 8), q.view(233, 2, 2, 8).transpose(0, 1))
    cu = plan.mini_cu_seqlens_q(2)
    assert cu.tolist() == [0, 62, 70, 134, 198, 200, 233, 295, 303, 367, 431, 433, 466]


def test_plan_shrinks_scoring_tiles_for_small_steps():
    """min_tiles: block_m halves only while a step has at most ~SMs / 2 work items (H100: 132)."""
    from vllm_xattn.kernels import min_scoring_tiles

    chunk = ([0, 8192], [131072])  # the last 8K chunk of a 128K prompt (vLLM's default chunk)
    llama, qwen = min_scoring_tiles(132, 32), min_scoring_tiles(132, 14)
    assert (llama, qwen, min_scoring_tiles(132, 16)) == (3, 5, 5)
    p16 = plan_prefill(*chunk, block_size=128, stride=16, min_tiles=llama)
    assert (p16.block_m, p16.num_tiles) == (128, 4)  # 128 items: the GPU is full
    p32 = plan_prefill(*chunk, block_size=128, stride=32, min_tiles=llama)
    assert (p32.block_m, p32.num_tiles) == (64, 4)  # 2 x 32 items would leave half the SMs idle
    pq = plan_prefill(*chunk, block_size=128, stride=16, min_tiles=qwen)
    assert (pq.block_m, pq.num_tiles) == (64, 8)
    # Several requests count together; an explicit block_m and the B/S floor are kept.
    two = plan_prefill([0, 4096, 8192], [65536, 4096], block_size=128, stride=32, min_tiles=llama)
    assert (two.block_m, two.num_tiles) == (64, 4)  # 1 + 1 tiles of 128 rows -> 2 + 2 of 64
    assert plan_prefill(*chunk, block_size=128, stride=32, block_m=128, min_tiles=99).block_m == 128
    tiny = plan_prefill([0, 64], [64], block_size=64, stride=4, min_tiles=99)
    assert tiny.block_m == 16 and tiny.num_tiles == 1
    assert plan_prefill(*chunk, block_size=128, stride=16).block_m == 128  # min_tiles off


def test_paged_cache_and_folded_views():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(300, 3, 8, generator=g), torch.randn(300, 3, 8, generator=g)
    cu = torch.tensor([0, 100, 300])
    kv, bt = make_paged_cache(k, v, cu, 16, num_pages_extra=2, generator=g)
    assert kv.shape[1:] == (3, 16, 16) and kv.permute(0, 2, 1, 3).is_contiguous()
    kf, vf, spp = folded_kv_views(kv)
    for r in range(2):
        for pos in (0, 15, 16, int(cu[r + 1] - cu[r]) - 1):
            for h in range(3):
                pid = int(bt[r, pos // 16]) * spp + h
                assert torch.equal(kf[pid, pos % 16, 0], k[int(cu[r]) + pos, h])
                assert torch.equal(vf[pid, pos % 16, 0], v[int(cu[r]) + pos, h])


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("device,case", CASES)
def test_scores_match_reference(device, case):
    p = make_problem(case, device)
    A = kernel_scores(p)
    got = unpack_scores(A.cpu(), p["plan"])
    for a, r in zip(got, ref_scores(p)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    # Packed layout: everything outside the requests' causal blocks is exactly 0.
    plan = p["plan"]
    j = torch.arange(plan.max_kb)
    assert (A.cpu()[:, j[None, :] > plan.row_block.cpu()[:, None]] == 0).all()


def test_scoring_rejects_inputs_it_cannot_read():
    p = make_problem(CPU_CASES["gqa_ctx_b64_s4_p16"], "cpu")
    q, kv, bt, plan = p["q"], p["kv"], p["bt"], p["plan"]
    with pytest.raises(ValueError, match="shape mismatch"):
        antidiagonal_scores_paged(q[..., :8], kv, bt, plan)  # head dim not half the cache's 2*D
    with pytest.raises(ValueError, match="page_size 48 must divide block_size 64"):
        antidiagonal_scores_paged(q, torch.zeros(4, kv.shape[1], 48, kv.shape[3]), bt, plan)
    with pytest.raises(ValueError, match="block_table rows must be contiguous"):
        antidiagonal_scores_paged(q, kv, bt.t().contiguous().t(), plan)


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_scores_strided_inputs(device):
    """q as a slice of a fused qkv tensor, cache in HND physical order."""
    case = CPU_CASES["gqa_ctx_b64_s4_p16"] if device == "cpu" else GPU_CASES["gqa_ctx_b128_s8_p16"]
    p = make_problem(case, device, seed=3)
    T, hq, d = p["q"].shape
    fused = torch.zeros(T, hq + 2 * p["hkv"], d)
    fused[:, :hq] = p["q"]
    q_view = fused.to(device)[:, :hq]
    assert not q_view.is_contiguous()
    p["kv"] = p["kv"].contiguous()  # HND: (num_pages, Hkv, page, 2D) contiguous
    A = kernel_scores(p, q_view)
    for a, r in zip(unpack_scores(A.cpu(), p["plan"]), ref_scores(p)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_scores_half_inputs(device, dtype):
    case = CPU_CASES["ctx_b64_s8_p64"] if device == "cpu" else GPU_CASES["gqa_b128_s16_p64"]
    p = make_problem(case, device, dtype=dtype, qscale=1.0)
    A = kernel_scores(p)
    for a, r in zip(unpack_scores(A.cpu(), p["plan"]), ref_scores(p)):  # reference upcasts the same values
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-4)


def random_case(seed, device):
    """Random varlen batch: 1-3 requests, context or not, GQA, B/S/page/tiles drawn at random."""
    rng = np.random.default_rng(seed)
    big = device == "cuda"
    B = int(rng.choice([64, 128])) if big else 64
    S = int(rng.choice([4, 8, 16] + ([32] if big else [])))
    page = int(rng.choice([p for p in (16, 32, 64, 128) if B % p == 0]))
    hkv = int(rng.choice([1, 2]))
    hq = hkv * int(rng.choice([1, 2, 4] if big else [1, 2]))
    d = int(rng.choice([64, 128])) if big else 16
    reqs = []
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.integers(1, 6000 if big else 400))
        reqs.append((int(rng.integers(1, n + 1)), n))
    bps = B // S
    bm = max(bps, int(rng.choice([64, 128] if big else [16, 32])))
    bn = max(bps, int(rng.choice([32, 64] if big else [16, 32])))
    return (reqs, hq, hkv, d, B, S, page, bm, bn)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("device", DEVICES)
def test_scores_random_shapes(device, seed):
    case = random_case(seed, device)
    p = make_problem(case, device, seed=seed)
    for a, r in zip(unpack_scores(kernel_scores(p).cpu(), p["plan"]), ref_scores(p)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case}: {m}")


# --------------------------------------------------------------------------- selection

SELECTIONS = {
    "thr0.9": dict(mode="threshold", threshold=0.9),
    "thr_head": dict(mode="threshold", threshold="per_head"),
    "topk3": dict(mode="topk", topk=3),
    "ratio0.3": dict(mode="ratio", ratio=0.3),
    "kvgroup0.8": dict(mode="threshold", threshold=0.8, granularity="kv_group"),
    "kvgroup_topk2": dict(mode="topk", topk=2, granularity="kv_group"),
}


def sel_kwargs(name, hq, hkv):
    kw = dict(SELECTIONS[name])
    if kw.get("threshold") == "per_head":
        kw["threshold"] = torch.tensor([0.0, 0.5, 0.95, 1.0] * hq)[:hq]
    if kw.get("granularity") == "kv_group":
        kw["num_kv_heads"] = hkv
    return kw


def check_id_order(counts, ids, plan):
    counts, ids, rb = counts.cpu(), ids.cpu(), plan.row_block.cpu()
    for h in range(ids.shape[0]):
        for row in range(ids.shape[1]):
            sel = ids[h, row, : int(counts[h, row])].tolist()
            assert sel[-1] == int(rb[row]) and sel[:-1] == sorted(set(sel[:-1])) and int(rb[row]) not in sel[:-1]


@pytest.mark.parametrize("sel", list(SELECTIONS))
@pytest.mark.parametrize("device", DEVICES)
def test_selection_exact_on_reference_scores(device, sel):
    case = CPU_CASES["b64_s16_p16_multi"] if device == "cpu" else GPU_CASES["gqa_ctx_b128_s8_p16"]
    case = (case[0] + ([(40, 1100)] if device == "cpu" else []),) + case[1:]  # one long row (18 blocks)
    p = make_problem(case, device)
    scores = ref_scores(p)
    kw = sel_kwargs(sel, p["q"].shape[1], p["hkv"])
    counts, ids = select_blocks_packed(pack(scores, p["plan"]).to(device), p["plan"], **kw)
    want = select_blocks(scores, **kw)
    got = masks_from_selection(counts, ids, p["plan"])
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
    assert int(counts.sum()) == sum(int(m.sum()) for m in want)
    check_id_order(counts, ids, p["plan"])


def test_selection_ties_and_degenerate():
    """Equal masses: ties go to the lower block; zero rows; tau 0 keeps only forced blocks."""
    plan = plan_prefill([0, 64 * 6], [64 * 6], block_size=64, stride=4, block_m=16, block_n=16)
    A = torch.zeros(2, 6, 6)
    for i in range(6):
        A[0, i, : i + 1] = 1.0  # all equal
    A[1, 5, :6] = torch.tensor([0.0, 2.0, 1.0, 2.0, 1.0, 0.0])
    scores = [A]
    for kw in (dict(mode="threshold", threshold=0.6), dict(mode="threshold", threshold=0.0),
               dict(mode="topk", topk=4), dict(mode="ratio", ratio=0.5), dict(mode="threshold", threshold=2.0)):
        counts, ids = select_blocks_packed(A, plan, **kw)
        assert torch.equal(masks_from_selection(counts, ids, plan)[0], select_blocks(scores, **kw)[0]), kw
        check_id_order(counts, ids, plan)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_blocks=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 4)), min_size=1, max_size=3),
    mode=st.sampled_from(["thr", "thr_head", "topk", "ratio", "kv_group"]),
    tau=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 1.0]),
    k=st.integers(1, 6),
)
def test_selection_exact_quantized_property(seed, n_blocks, mode, tau, k):
    """Masses on a 1/4 grid (many ties, exact sums): the kernel equals the reference exactly."""
    if not INTERPRET:
        pytest.skip("CPU interpreter variant")
    B, hq, hkv = 64, 4, 2
    reqs = [(min(qb, n) * B - 5 if min(qb, n) > 1 else 7, n * B - 3) for n, qb in n_blocks]  # (Tq, N)
    reqs = [(max(1, min(tq, nn)), nn) for tq, nn in reqs]
    cu = np.cumsum([0] + [t for t, _ in reqs]).tolist()
    plan = plan_prefill(cu, [nn for _, nn in reqs], block_size=B, stride=4, block_m=16, block_n=16)
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(0, 5, (hq, plan.total_q_blocks, plan.max_kb), generator=g).float() / 4
    j = torch.arange(plan.max_kb)
    A = A.masked_fill(j[None, None, :] > plan.row_block[None, :, None], 0.0)
    scores = []
    for r, (_, nn) in enumerate(reqs):
        n_kb, qb0 = (nn - 1) // B + 1, (nn - reqs[r][0]) // B
        o = plan.q_block_offset[r]
        scores.append(A[:, o : o + n_kb - qb0, :n_kb])
    kw = {"thr": dict(mode="threshold", threshold=tau),
          "thr_head": dict(mode="threshold", threshold=torch.tensor([tau, 0.5, 1.0, 0.25])),
          "topk": dict(mode="topk", topk=k), "ratio": dict(mode="ratio", ratio=k / 6),
          "kv_group": dict(mode="threshold", threshold=tau, granularity="kv_group", num_kv_heads=hkv)}[mode]
    counts, ids = select_blocks_packed(A, plan, **kw)
    want = select_blocks(scores, **kw)
    for g_, w_ in zip(masks_from_selection(counts, ids, plan), want):
        assert torch.equal(g_, w_)
    assert int(counts.sum()) == sum(int(m.sum()) for m in want)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tau=st.sampled_from([0.3, 0.7, 0.9, 0.99, 1.0]),
       zeros=st.floats(0.0, 0.5))
def test_selection_exact_masses_of_every_magnitude(seed, tau, zeros):
    """Masses m * 2^e (m 1..7, e -12..3: up to 56, so bit levels above 2^30, where the search's
    32-bit bounds must not overflow) with zeros and ties: sums stay exact, so the kernel's
    bisection must equal the reference's sort exactly."""
    if not INTERPRET:
        pytest.skip("CPU interpreter variant")
    B, hq = 64, 3
    plan = plan_prefill([0, 20 * B], [20 * B], block_size=B, stride=4, block_m=16, block_n=16)
    g = torch.Generator().manual_seed(seed)
    shape = (hq, plan.total_q_blocks, plan.max_kb)
    A = torch.randint(1, 8, shape, generator=g).float() * torch.exp2(torch.randint(-12, 4, shape, generator=g).float())
    A = A.masked_fill(torch.rand(shape, generator=g) < zeros, 0.0)
    A = A.masked_fill(torch.arange(plan.max_kb)[None, None, :] > plan.row_block[None, :, None], 0.0)
    for kw in (dict(mode="threshold", threshold=tau), dict(mode="topk", topk=1 + seed % 9)):
        counts, ids = select_blocks_packed(A, plan, **kw)
        assert torch.equal(masks_from_selection(counts, ids, plan)[0], select_blocks([A], **kw)[0]), kw
        check_id_order(counts, ids, plan)


@pytest.mark.parametrize("device,case", CASES[:2] + [c for c in CASES if c.values[0] == "cuda"][:2])
def test_selection_on_kernel_scores(device, case):
    p = make_problem(case, device)
    kw = dict(mode="threshold", threshold=0.9)
    A = kernel_scores(p)
    counts, ids = select_blocks_packed(A, p["plan"], **kw)
    got = masks_from_selection(counts, ids, p["plan"])
    want = select_blocks(ref_scores(p), **kw)
    diff = sum(int((g_ != w_).sum()) for g_, w_ in zip(got, want))
    total = sum(w_.numel() for w_ in want)
    print(f"selection on kernel scores: mask mismatch rate {diff / total:.2e} ({diff}/{total})")
    assert diff / total <= 0.01, f"mask mismatch rate {diff / total:.4f}"


# --------------------------------------------------------------------------- page lists (end to end)


def attend_page_lists(p, lists, q_mini, group):
    """Reference attention per mini-request, K/V gathered through the folded page lists."""
    kf, vf, _ = folded_kv_views(p["kv"].cpu())
    page = p["kv"].shape[2]
    pt, sk, cu = lists.page_table.cpu(), lists.seqused_k.cpu(), lists.cu_seqlens_q.cpu()
    d = q_mini.shape[-1]
    out = torch.zeros_like(q_mini, dtype=torch.float32)
    used_q = None if lists.seqused_q is None else lists.seqused_q.cpu()
    for m in range(len(sk)):
        n_k, q0 = int(sk[m]), int(cu[m])
        q1 = int(cu[m + 1]) if used_q is None else q0 + int(used_q[m])
        pages = pt[m, : math.ceil(n_k / page)].long()
        kk = kf[pages].reshape(-1, d)[:n_k].float()
        vv = vf[pages].reshape(-1, d)[:n_k].float()
        qq = q_mini[q0:q1].float()  # [Lq, G, D]
        lq = q1 - q0
        s = torch.einsum("tgd,nd->gtn", qq, kk) / math.sqrt(d)
        allowed = torch.arange(n_k)[None, :] <= (n_k - lq + torch.arange(lq))[:, None]  # bottom-right causal
        pr = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        out[q0:q1] = torch.einsum("gtn,nd->tgd", pr, vv)
    return out


PAGE_LIST_CASES = [c for c in CASES if c.values[0] == "cpu"][:3] + [c for c in CASES if c.values[0] == "cuda"][:2]


@pytest.mark.parametrize("granularity", ["head", "kv_group"])
@pytest.mark.parametrize("device,case", PAGE_LIST_CASES)
def test_page_lists_end_to_end(device, case, granularity):
    p = make_problem(case, device)
    hq, hkv = p["q"].shape[1], p["hkv"]
    kw = dict(mode="threshold", threshold=0.8, granularity=granularity, num_kv_heads=hkv)
    counts, ids = select_blocks_packed(kernel_scores(p), p["plan"], **kw)
    lists = build_page_lists(counts, ids, p["bt"], p["kv"], p["plan"], granularity=granularity, num_kv_heads=hkv)
    masks = masks_from_selection(counts, ids, p["plan"])
    want = block_sparse_attention(p["q"], p["k"], p["v"], p["cu_q"], p["cu_k"], masks, block_size=p["B"])

    group = hq // hkv if granularity == "kv_group" else 1
    T, d = p["q"].shape[0], p["q"].shape[2]
    plan_cpu = p["plan"].to("cpu")
    idx = plan_cpu.query_index(hq, group)
    q_mini = p["q"].reshape(-1, d)[idx].view(hq // group * T, group, d)
    assert torch.equal(lists.cu_seqlens_q.cpu(), plan_cpu.mini_cu_seqlens_q(hq // group))
    assert int(lists.seqused_k.max()) <= lists.max_seqlen_k
    out = attend_page_lists(p, lists, q_mini, group)
    got = torch.empty(T * hq, d)
    got[idx] = out.reshape(-1, d)
    torch.testing.assert_close(got.view(T, hq, d), want, rtol=1e-4, atol=1e-4)

    # Longest-first order (what the FA3 executor runs): the same lists, rows permuted per head,
    # query rows found through unsorted offsets + seqused_q; the same output.
    hs, tqb = hq // group, p["plan"].total_q_blocks
    row_pos, starts, used_q = plan_cpu.mini_requests_longest_first(hs)
    keys = plan_cpu.row_block.long() * p["B"] + plan_cpu.row_last_len.long()
    by_pos = torch.empty_like(row_pos)
    by_pos[row_pos.long()] = torch.arange(tqb, dtype=torch.int32)
    assert bool((keys[by_pos.long()].diff() <= 0).all())  # most causal keys first
    dev = p["dev"]
    lists_lf = build_page_lists(counts, ids, p["bt"], p["kv"], p["plan"], granularity=granularity,
                                num_kv_heads=hkv, cu_seqlens_q=starts.to(dev), row_pos=row_pos.to(dev),
                                seqused_q=used_q.to(dev))
    page = p["kv"].shape[2]
    for h in range(hs):
        for r in range(tqb):
            m, m_lf = h * tqb + r, h * tqb + int(row_pos[r])
            assert int(lists_lf.seqused_k[m_lf]) == int(lists.seqused_k[m])
            assert int(starts[m_lf]) == int(lists.cu_seqlens_q[m])
            assert int(used_q[m_lf]) == int(lists.cu_seqlens_q[m + 1] - lists.cu_seqlens_q[m])
            n_pg = math.ceil(int(lists.seqused_k[m]) / page)
            assert torch.equal(lists_lf.page_table[m_lf, :n_pg], lists.page_table[m, :n_pg])
    torch.testing.assert_close(attend_page_lists(p, lists_lf, q_mini, group), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="row_pos"):
        build_page_lists(counts, ids, p["bt"], p["kv"], p["plan"], granularity=granularity,
                         num_kv_heads=hkv, row_pos=row_pos.to(dev))

    # Head chunks into a reused buffer give the same rows as the whole.
    hs = hq // group
    if hs > 1:
        h0, h1 = 1, hs
        buf = torch.empty_like(lists.page_table)
        part = build_page_lists(counts, ids, p["bt"], p["kv"], p["plan"], granularity=granularity,
                                num_kv_heads=hkv, heads=(h0, h1), page_table=buf)
        tqb = p["plan"].total_q_blocks
        sl = slice(h0 * tqb, h1 * tqb)
        assert torch.equal(part.seqused_k, lists.seqused_k[sl])
        assert torch.equal(part.cu_seqlens_q, lists.cu_seqlens_q[h0 * tqb : h1 * tqb + 1] - h0 * T)
        for m in range((h1 - h0) * tqb):
            n_pg = math.ceil(int(part.seqused_k[m]) / p["kv"].shape[2])
            assert torch.equal(part.page_table[m, :n_pg], lists.page_table[sl][m, :n_pg])


# --------------------------------------------------------------------------- page lists as CSR (FlashInfer)


def attend_csr(p, csr, n_mini, q_mini):
    """Reference attention per mini-request the way FlashInfer's paged prefill reads a CSR:
    key length ``(pages - 1) * page_size + last_page_len``, bottom-right causal."""
    kf, vf, _ = folded_kv_views(p["kv"].cpu())
    page = p["kv"].shape[2]
    ip, ind, last = csr.indptr.cpu(), csr.indices.cpu(), csr.last_page_len.cpu()
    d = q_mini.shape[-1]
    cu = p["cu_mini"]
    out = torch.zeros_like(q_mini, dtype=torch.float32)
    for m in range(n_mini):
        pages = ind[int(ip[m]):int(ip[m + 1])].long()
        n_k = (len(pages) - 1) * page + int(last[m])
        kk = kf[pages].reshape(-1, d)[:n_k].float()
        vv = vf[pages].reshape(-1, d)[:n_k].float()
        q0, q1 = int(cu[m]), int(cu[m + 1])
        lq = q1 - q0
        s = torch.einsum("tgd,nd->gtn", q_mini[q0:q1].float(), kk) / math.sqrt(d)
        allowed = torch.arange(n_k)[None, :] <= (n_k - lq + torch.arange(lq))[:, None]
        out[q0:q1] = torch.einsum("gtn,nd->tgd", torch.softmax(s.masked_fill(~allowed, float("-inf")), -1), vv)
    return out


@pytest.mark.parametrize("granularity", ["head", "kv_group"])
@pytest.mark.parametrize("device,case", PAGE_LIST_CASES)
def test_page_csr_matches_page_lists(device, case, granularity):
    """Same page ids as the padded lists, rows packed back to back, nothing written past the
    last row (the diagonal block's tail is clipped), last_page_len in 1..page_size."""
    p = make_problem(case, device)
    hkv, page = p["hkv"], p["kv"].shape[2]
    kw = dict(granularity=granularity, num_kv_heads=hkv)
    counts, ids = select_blocks_packed(kernel_scores(p), p["plan"], mode="threshold", threshold=0.8, **kw)
    lists = build_page_lists(counts, ids, p["bt"], p["kv"], p["plan"], **kw)
    indices = torch.full((lists.page_table.numel() + 64,), -7, dtype=torch.int32, device=device)
    csr = build_page_csr(counts, ids, p["bt"], p["kv"], p["plan"], indices=indices, **kw)
    sk, pt, ind = lists.seqused_k.cpu(), lists.page_table.cpu(), indices.cpu()
    ip, last = csr.indptr.cpu().tolist(), csr.last_page_len.cpu()
    assert ip[0] == 0 and len(ip) == len(sk) + 1
    for m in range(len(sk)):
        n = math.ceil(int(sk[m]) / page)
        assert ip[m + 1] - ip[m] == n
        assert torch.equal(ind[ip[m]:ip[m + 1]], pt[m, :n])
        assert int(last[m]) == int(sk[m]) - (n - 1) * page and 1 <= int(last[m]) <= page
    assert (ind[ip[-1]:] == -7).all()


@pytest.mark.parametrize("granularity", ["head", "kv_group"])
@pytest.mark.parametrize("device,case", PAGE_LIST_CASES)
def test_page_csr_end_to_end_reused_buffers(device, case, granularity):
    """Two layers' selections (dense-ish, then sparse) written in turn into the same buffers,
    whole and per head chunk, each executed the FlashInfer way, match the reference."""
    p = make_problem(case, device)
    hq, hkv, T, d = p["q"].shape[1], p["hkv"], p["q"].shape[0], p["q"].shape[2]
    group = hq // hkv if granularity == "kv_group" else 1
    hs = hq // group
    plan_cpu = p["plan"].to("cpu")
    idx = plan_cpu.query_index(hq, group)
    q_mini = p["q"].reshape(-1, d)[idx].view(hs * T, group, d)
    tqb = plan_cpu.total_q_blocks
    buf = dict(indptr=torch.empty(hs * tqb + 1, dtype=torch.int32, device=device),
               last_page_len=torch.empty(hs * tqb, dtype=torch.int32, device=device),
               indices=torch.empty(hs * tqb * plan_cpu.max_kb * p["B"] // p["kv"].shape[2] + 5,
                                   dtype=torch.int32, device=device))
    kw = dict(granularity=granularity, num_kv_heads=hkv)
    for sel in (dict(mode="threshold", threshold=0.95), dict(mode="topk", topk=2)):
        counts, ids = select_blocks_packed(kernel_scores(p), p["plan"], **sel, **kw)
        masks = masks_from_selection(counts, ids, p["plan"])
        want = block_sparse_attention(p["q"], p["k"], p["v"], p["cu_q"], p["cu_k"], masks, block_size=p["B"])
        for h0, h1 in ((0, hs),) + (((1, hs),) if hs > 1 else ()):
            csr = build_page_csr(counts, ids, p["bt"], p["kv"], p["plan"], heads=(h0, h1), **buf, **kw)
            p["cu_mini"] = plan_cpu.mini_cu_seqlens_q(h1 - h0)
            got = attend_csr(p, csr, (h1 - h0) * tqb, q_mini[h0 * T:h1 * T])
            full = torch.empty(hs * T, group, d)
            full[h0 * T:h1 * T] = got
            out = torch.empty(T * hq, d)
            out[idx] = full.reshape(-1, d)
            out = out.view(T, hs, group, d)[:, h0:h1].reshape(T, -1, d)
            ref = want.view(T, hs, group, d)[:, h0:h1].reshape(T, -1, d)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{sel} heads {h0}:{h1}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,hq,group,d", [(1, 4, 1, 64), (37, 4, 1, 64), (70, 8, 4, 32), (5, 2, 2, 128)])
def test_copy_tokens_heads_both_ways(device, T, hq, group, d):
    """Token-major (a strided slice, like vLLM's query) <-> head-major and back, like torch."""
    heads = hq // group
    qkv = torch.randn(T + 3, hq + 6, d, device=device).to(torch.bfloat16)
    q = qkv[2 : 2 + T, :hq]  # row stride (hq + 6) * d: not contiguous
    hm = torch.empty(heads, T, group, d, dtype=q.dtype, device=device)
    copy_tokens_heads(hm.transpose(0, 1), q.reshape(T, heads, group, d))
    assert torch.equal(hm, q.reshape(T, heads, group, d).transpose(0, 1))
    back = torch.full((T + 2, hq, d), -1.0, dtype=q.dtype, device=device)
    copy_tokens_heads(back[1 : 1 + T].view(T, heads, group, d), hm.transpose(0, 1))
    assert torch.equal(back[1 : 1 + T], q) and bool((back[0] == -1).all() and (back[-1] == -1).all())
