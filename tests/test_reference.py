"""Tests of the pure-PyTorch XAttention reference (vllm_xattn.reference), CPU only.

The reference is checked against deliberately naive re-implementations written
here from the spec (explicit Python loops, float64), plus hypothesis properties.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_xattn.reference import (
    antidiagonal_block_scores,
    block_sparse_attention,
    causal_attention,
    density,
    select_blocks,
    xattention,
)

HYP = settings(max_examples=20, deadline=None)


# --------------------------------------------------------------------------- helpers


def make_batch(seed, reqs, hq, hkv, d, dtype=torch.float32):
    """reqs: list of (tq, n). Returns q, k, v, cu_q, cu_k."""
    g = torch.Generator().manual_seed(seed)
    tq_tot, n_tot = sum(t for t, _ in reqs), sum(n for _, n in reqs)
    q = torch.randn(tq_tot, hq, d, generator=g).to(dtype)
    k = torch.randn(n_tot, hkv, d, generator=g).to(dtype)
    v = torch.randn(n_tot, hkv, d, generator=g).to(dtype)
    cu_q = torch.tensor([0] + np.cumsum([t for t, _ in reqs]).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + np.cumsum([n for _, n in reqs]).tolist(), dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def naive_scores(q, k, cu_q, cu_k, S, B):
    """Row by row, dot product by dot product, straight from the spec (float64)."""
    qn, kn = q.double().numpy(), k.double().numpy()
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    G, scale = hq // hkv, 1.0 / (math.sqrt(d) * S)
    zero = np.zeros(d)
    out = []
    for r in range(len(cu_q) - 1):
        qs, ks = int(cu_q[r]), int(cu_k[r])
        tq, n = int(cu_q[r + 1]) - qs, int(cu_k[r + 1]) - ks
        ctx = n - tq
        qb0, last = ctx // B, (n - 1) // B
        A = np.zeros((hq, last - qb0 + 1, last + 1))
        for h in range(hq):
            Q = lambda p: qn[qs + p - ctx, h] if ctx <= p < n else zero  # noqa: E731
            K = lambda p: kn[ks + p, h // G] if p < n else zero  # noqa: E731
            for a in range(ctx // S, (n - 1) // S + 1):
                row = np.array(
                    [scale * sum(np.dot(Q(a * S + S - 1 - t), K(b * S + t)) for t in range(S)) for b in range(a + 1)]
                )
                p = np.exp(row - row.max())
                p /= p.sum()
                for b in range(a + 1):
                    A[h, (a * S) // B - qb0, (b * S) // B] += p[b]
        out.append(A)
    return out


def naive_select_row(a, i, mode, tau=None, topk=None, ratio=None):
    """One row: a = list of masses for key blocks 0..i. Returns the set of kept j."""
    kept = {0, i}
    others = sorted((j for j in range(i + 1) if j not in kept), key=lambda j: (-a[j], j))
    if mode == "threshold":
        if tau >= 1.0:
            return set(range(i + 1))
        total, mass = sum(a[: i + 1]), sum(a[j] for j in kept)
        for j in others:
            if mass >= tau * total:
                break
            kept.add(j)
            mass += a[j]
        return kept
    k = topk if mode == "topk" else math.ceil(ratio * (i + 1))
    k = min(max(k, len(kept)), i + 1)
    return kept | set(others[: k - len(kept)])


def naive_select(scores, mode, tau=None, topk=None, ratio=None, group=1):
    masks = []
    for A in scores:
        A = A.double()
        hq, n_qb, n_kb = A.shape
        m = torch.zeros(hq, n_qb, n_kb, dtype=torch.bool)
        for h0 in range(0, hq, group):
            heads = range(h0, h0 + group)
            a_sum = sum(A[h] for h in heads)
            t = max(float(tau[h]) for h in heads) if tau is not None else None
            for r in range(n_qb):
                i = n_kb - n_qb + r
                for j in naive_select_row(a_sum[r].tolist(), i, mode, t, topk, ratio):
                    m[list(heads), r, j] = True
        masks.append(m)
    return masks


def naive_attention(q, k, v, cu_q, cu_k, masks, B, scale=None):
    """Explicit masked softmax, one query row at a time."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    G = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r in range(len(cu_q) - 1):
        qs, ks = int(cu_q[r]), int(cu_k[r])
        tq, n = int(cu_q[r + 1]) - qs, int(cu_k[r + 1]) - ks
        ctx = n - tq
        qb0 = ctx // B
        for h in range(hq):
            for jq in range(tq):
                p = ctx + jq
                keys = [s for s in range(n) if s <= p and masks[r][h, p // B - qb0, s // B]]
                if not keys:
                    continue
                logits = torch.stack([scale * q[qs + jq, h].double() @ k[ks + s, h // G].double() for s in keys])
                w = torch.softmax(logits, 0)
                out[qs + jq, h] = sum(w[c] * v[ks + s, h // G].double() for c, s in enumerate(keys))
    return out


# --------------------------------------------------------------------------- vs naive

# (stride, block, hq, hkv, d, [(tq, n), ...]); ctx = n - tq
SCORE_CASES = [
    (8, 64, 2, 2, 8, [(130, 130)]),  # plain prefill, N not a multiple of B
    (4, 64, 4, 2, 8, [(70, 197), (5, 5)]),  # GQA, ctx=127 (partial block/super-row), tiny request
    (16, 64, 4, 1, 8, [(100, 233), (64, 128), (1, 300)]),  # MQA, aligned ctx, single decode-like row
    (8, 64, 3, 3, 16, [(37, 101), (200, 203)]),  # ctx = 64 + 0 (block-aligned), ctx=3
    (32, 128, 2, 1, 8, [(150, 290), (129, 129)]),  # B=128, ctx=140
    (8, 128, 2, 2, 8, [(9, 250)]),  # queries within one partial block
]


@pytest.mark.parametrize("S,B,hq,hkv,d,reqs", SCORE_CASES)
def test_scores_match_naive(S, B, hq, hkv, d, reqs):
    q, k, _, cu_q, cu_k = make_batch(0, reqs, hq, hkv, d)
    got = antidiagonal_block_scores(q, k, cu_q, cu_k, stride=S, block_size=B)
    want = naive_scores(q, k, cu_q, cu_k, S, B)
    assert len(got) == len(want)
    for g_, w in zip(got, want):
        assert g_.dtype == torch.float32 and g_.shape == w.shape
        torch.testing.assert_close(g_.double(), torch.from_numpy(w), atol=1e-5, rtol=1e-5)


def test_scores_row_sums_count_super_rows():
    S, B = 8, 64
    reqs = [(100, 277), (50, 50)]
    q, k, _, cu_q, cu_k = make_batch(1, reqs, 2, 1, 8)
    for A, (tq, n) in zip(antidiagonal_block_scores(q, k, cu_q, cu_k, stride=S, block_size=B), reqs):
        ctx = n - tq
        rows = list(range(ctx // S, (n - 1) // S + 1))
        counts = torch.tensor([sum(1 for a in rows if a * S // B == i) for i in range(ctx // B, (n - 1) // B + 1)])
        torch.testing.assert_close(A.sum(-1), counts.float().expand_as(A.sum(-1)), atol=1e-5, rtol=0)
        assert torch.all(A.triu(diagonal=1 + ctx // B) == 0)  # j > i is zero


def _random_scores(seed):
    q, k, _, cu_q, cu_k = make_batch(seed, [(700, 1000), (300, 300), (90, 650)], 4, 2, 16)
    return antidiagonal_block_scores(q, k, cu_q, cu_k, stride=8, block_size=64)


SELECT_CASES = [
    dict(mode="threshold", threshold=0.9),
    dict(mode="threshold", threshold=0.0),
    dict(mode="threshold", threshold=torch.tensor([0.3, 0.95, 1.0, 0.6])),
    dict(mode="threshold", threshold=torch.tensor([0.3, 0.95, 1.0, 0.6]), granularity="kv_group", num_kv_heads=2),
    dict(mode="threshold", threshold=0.7, granularity="kv_group", num_kv_heads=1),
    dict(mode="topk", topk=1),
    dict(mode="topk", topk=4),
    dict(mode="topk", topk=3, granularity="kv_group", num_kv_heads=2),
    dict(mode="ratio", ratio=0.3),
    dict(mode="ratio", ratio=1.0),
    dict(mode="ratio", ratio=0.5, granularity="kv_group", num_kv_heads=2),
]


@pytest.mark.parametrize("kw", SELECT_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_select_matches_naive(kw):
    scores = _random_scores(2)
    got = select_blocks(scores, **kw)
    hq = scores[0].shape[0]
    tau = kw.get("threshold")
    if tau is not None and not isinstance(tau, torch.Tensor):
        tau = [tau] * hq
    group = hq // kw["num_kv_heads"] if kw.get("granularity") == "kv_group" else 1
    want = naive_select(scores, kw["mode"], tau, kw.get("topk"), kw.get("ratio"), group)
    for g_, w in zip(got, want):
        assert g_.dtype == torch.bool
        assert torch.equal(g_, w)


def test_select_ties_prefer_lower_block():
    # Uniform mass over 6 blocks in the last row: order of addition must be j = 1, 2, 3...
    A = torch.tril(torch.ones(1, 6, 6))
    (m,) = select_blocks([A], mode="threshold", threshold=0.6)  # row 5: 2/6 forced, needs 4/6 >= 3.6/6
    assert m[0, 5].tolist() == [True, True, True, False, False, True]
    (m,) = select_blocks([A], mode="topk", topk=3)
    assert m[0, 5].tolist() == [True, True, False, False, False, True]
    assert m[0, 0].tolist() == [True] + [False] * 5  # i == 0: only the sink (== diagonal)


def test_density():
    A = torch.rand(2, 4, 4) + 0.1  # entries above the diagonal are no candidates
    (m,) = select_blocks([A], mode="topk", topk=2)
    # rows i=0..3 -> kept 1, 2, 2, 2 per head; candidates 1+2+3+4
    assert density([m]) == pytest.approx(7 / 10)
    assert density(select_blocks([A], threshold=1.0)) == 1.0


def test_block_sparse_attention_matches_explicit():
    B = 64
    reqs = [(150, 290), (64, 64), (3, 140)]
    q, k, v, cu_q, cu_k = make_batch(3, reqs, 4, 2, 8)
    g = torch.Generator().manual_seed(4)
    masks = []
    for tq, n in reqs:
        ctx = n - tq
        qb0, n_kb = ctx // B, -(-n // B)
        m = torch.rand(4, n_kb - qb0, n_kb, generator=g) < 0.5
        m[0, 0] = False  # a row with no visible key at all must give zeros
        masks.append(m)
    got = block_sparse_attention(q, k, v, cu_q, cu_k, masks, block_size=B, scale=0.3)
    want = naive_attention(q, k, v, cu_q, cu_k, masks, B, scale=0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_dtypes_and_xattention():
    q, k, v, cu_q, cu_k = make_batch(5, [(100, 180), (40, 40)], 4, 2, 16, dtype=torch.bfloat16)
    out, masks, scores = xattention(q, k, v, cu_q, cu_k, stride=8, block_size=64, threshold=0.8, granularity="kv_group")
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert all(s.dtype == torch.float32 for s in scores)
    assert all(torch.equal(m[0::2], m[1::2]) for m in masks)  # kv_group: shared by the 2 heads of a group
    ref = block_sparse_attention(q.float(), k.float(), v.float(), cu_q, cu_k, masks, block_size=64)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_validation_errors():
    A = [torch.tril(torch.rand(2, 3, 3))]
    with pytest.raises(ValueError, match="mode"):
        select_blocks(A, mode="topp")
    with pytest.raises(ValueError, match="granularity"):
        select_blocks(A, granularity="token")
    with pytest.raises(ValueError, match="topk"):
        select_blocks(A, mode="topk")
    with pytest.raises(ValueError, match="ratio"):
        select_blocks(A, mode="ratio", ratio=1.5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        select_blocks(A, granularity="kv_group")
    with pytest.raises(ValueError, match="threshold"):
        select_blocks(A, threshold=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="threshold"):
        select_blocks(A, threshold=-0.1)
    q, k, _, cu_q, cu_k = make_batch(0, [(10, 20)], 2, 2, 8)
    with pytest.raises(ValueError, match="block_size"):
        antidiagonal_block_scores(q, k, cu_q, cu_k, stride=8, block_size=32)
    with pytest.raises(ValueError, match="stride"):
        antidiagonal_block_scores(q, k, cu_q, cu_k, stride=12, block_size=64)
    with pytest.raises(ValueError, match="query length"):
        antidiagonal_block_scores(q, k, cu_q, torch.tensor([0, 5]), stride=8, block_size=64)  # Tq > N


# --------------------------------------------------------------------------- properties


@st.composite
def batches(draw, max_n=400):
    S = draw(st.sampled_from([4, 8, 16, 32]))
    B = draw(st.sampled_from([64, 128]))
    hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    d = draw(st.sampled_from([8, 16]))
    reqs = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, max_n))
        reqs.append((draw(st.integers(1, n)), n))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), S=S, B=B, hq=hkv * G, hkv=hkv, d=d, reqs=reqs)


@HYP
@given(batches())
def test_dense_threshold_equals_causal(cfg):
    q, k, v, cu_q, cu_k = make_batch(cfg["seed"], cfg["reqs"], cfg["hq"], cfg["hkv"], cfg["d"])
    out, masks, _ = xattention(q, k, v, cu_q, cu_k, stride=cfg["S"], block_size=cfg["B"], threshold=1.0)
    for m in masks:  # every causal block, nothing above the diagonal
        n_qb, n_kb = m.shape[1:]
        assert torch.equal(m, torch.ones_like(m).tril(diagonal=n_kb - n_qb))
    torch.testing.assert_close(out, causal_attention(q, k, v, cu_q, cu_k), atol=1e-5, rtol=1e-5)


@HYP
@given(batches(max_n=700), st.floats(0.0, 0.999), st.sampled_from(["head", "kv_group"]))
def test_threshold_mass_sink_diagonal(cfg, tau, granularity):
    q, k, _, cu_q, cu_k = make_batch(cfg["seed"], cfg["reqs"], cfg["hq"], cfg["hkv"], cfg["d"])
    scores = antidiagonal_block_scores(q, k, cu_q, cu_k, stride=cfg["S"], block_size=cfg["B"])
    masks = select_blocks(scores, threshold=tau, granularity=granularity, num_kv_heads=cfg["hkv"])
    G = cfg["hq"] // cfg["hkv"]
    for A, m in zip(scores, masks):
        if granularity == "kv_group":
            A = A.view(cfg["hkv"], G, *A.shape[1:]).sum(1)
            m = m[::G]
        n_qb, n_kb = A.shape[1:]
        for r in range(n_qb):
            i = n_kb - n_qb + r
            row, sel = A[:, r, : i + 1].double(), m[:, r]
            assert sel[:, 0].all() and sel[:, i].all()  # sink and diagonal
            assert not sel[:, i + 1 :].any()  # never above the diagonal
            kept = (row * sel[:, : i + 1]).sum(-1)
            target = tau * row.sum(-1)
            assert torch.all(kept >= target - 1e-5)
            # minimal: dropping the weakest optional kept block falls short of the target
            opt = sel[:, : i + 1].clone()
            opt[:, 0] = opt[:, i] = False
            weakest = torch.where(opt, row, torch.inf).amin(-1)
            has = opt.any(-1)
            assert torch.all(kept[has] - weakest[has] < target[has] + 1e-5)


@HYP
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 900),
    st.integers(0, 9),
    st.sampled_from([4, 8, 16, 32]),
    st.sampled_from([64, 128]),
    st.sampled_from([dict(threshold=0.85), dict(mode="topk", topk=3), dict(mode="ratio", ratio=0.4)]),
)
def test_chunked_prefill_matches_unchunked(seed, n, cuts_seed, S, B, sel):
    hq, hkv, d = 4, 2, 8
    q, k, v, cu_q, cu_k = make_batch(seed, [(n, n)], hq, hkv, d)
    out, masks, scores = xattention(q, k, v, cu_q, cu_k, stride=S, block_size=B, **sel)
    # split at random multiples of B; chunk c = queries [s, e) with keys [0, e)
    inner = list(range(B, n, B))
    rng = np.random.default_rng(cuts_seed)
    cuts = sorted(rng.choice(inner, size=rng.integers(0, len(inner) + 1), replace=False).tolist()) if inner else []
    bounds = [0] + cuts + [n]
    ends = bounds[1:]
    kc = torch.cat([k[:e] for e in ends])
    vc = torch.cat([v[:e] for e in ends])
    cu_kc = torch.tensor([0] + np.cumsum(ends).tolist())
    cu_qc = torch.tensor(bounds)
    out_c, masks_c, scores_c = xattention(q, kc, vc, cu_qc, cu_kc, stride=S, block_size=B, **sel)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    n_kb = masks[0].shape[2]
    pad = lambda t: torch.nn.functional.pad(t, (0, n_kb - t.shape[2]))  # noqa: E731
    torch.testing.assert_close(torch.cat([pad(s) for s in scores_c], 1), scores[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([pad(m) for m in masks_c], 1), masks[0])


@HYP
@given(batches(max_n=500), st.sampled_from([0.5, 0.9, 1.0]))
def test_gqa_equals_repeated_mha(cfg, tau):
    q, k, v, cu_q, cu_k = make_batch(cfg["seed"], cfg["reqs"], cfg["hq"], cfg["hkv"], cfg["d"])
    G = cfg["hq"] // cfg["hkv"]
    kw = dict(stride=cfg["S"], block_size=cfg["B"], threshold=tau)
    out, masks, scores = xattention(q, k, v, cu_q, cu_k, **kw)
    rep = lambda t: t.repeat_interleave(G, dim=1)  # noqa: E731
    out_m, masks_m, scores_m = xattention(q, rep(k), rep(v), cu_q, cu_k, **kw)
    torch.testing.assert_close(out, out_m, atol=1e-5, rtol=1e-5)
    for a, b in zip(scores, scores_m):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(masks, masks_m):
        assert torch.equal(a, b)
