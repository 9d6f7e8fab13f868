"""Scoring's whole-tile TMA path: the plan's key-copy offsets, the key copy kernel, and scores
through TMA equal to the masked loads' and the reference's (CPU under TRITON_INTERPRET=1; the
``gpu`` tests in bf16 on the H100, where the TMA path runs in serving)."""
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.test_kernels_interpret import DEVICES, make_problem, ref_scores  # noqa: E402
from vllm_xattn.kernels import (  # noqa: E402
    antidiagonal_scores_paged,
    copy_keys,
    key_copy_capacity,
    key_copy_rows,
    plan_prefill,
    tma_device,
    unpack_scores,
)
from vllm_xattn.kernels import scoring  # noqa: E402
from vllm_xattn.kernels.scoring import tma_key_source, tma_supported  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_common import step_keys  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def test_plan_copies_the_longest_requests_with_whole_tiles_within_capacity():
    # B 64, S 4: 16 super-rows per block, tiles of 16 rows = one block. Request 0: 300 query
    # tokens after 100 of context (blocks 1..6; whole tiles: blocks 2..5 -> 4); request 1: 64
    # tokens, one whole tile; request 2: a 10-token chunk, none.
    kw = dict(block_size=64, stride=4, block_m=16, block_n=16)
    cu, lens = [0, 300, 364, 374], [400, 64, 5000]
    plan = plan_prefill(cu, lens, **kw)
    assert plan.key_offset.tolist() == [0, 400, -1] and plan.key_copy_rows == 464
    # longest first within the capacity: request 0 (400 keys) fits, then request 1 does not
    plan = plan_prefill(cu, lens, key_copy_capacity=420, **kw)
    assert plan.key_offset.tolist() == [0, -1, -1] and plan.key_copy_rows == 400
    plan = plan_prefill(cu, lens, key_copy_min_tiles=2, **kw)
    assert plan.key_offset.tolist() == [0, -1, -1]
    plan = plan_prefill(cu, lens, key_copy_capacity=300, **kw)
    assert plan.key_offset.tolist() == [-1, 0, -1] and plan.key_copy_rows == 64
    assert key_copy_rows(plan) == 64 and key_copy_capacity(1000) == 1024


@pytest.mark.parametrize("device", DEVICES)
def test_copy_keys_gathers_each_copied_request_from_its_pages(device):
    case = ([(70, 200), (130, 130), (33, 300)], 4, 2, 16, 64, 4, 16, 16, 16)
    p = make_problem(case, device)
    plan = plan_prefill(p["cu_q"], [200, 130, 300], block_size=64, stride=4, block_m=16, block_n=16,
                        key_copy_capacity=520, key_copy_min_tiles=0).to(device)
    offsets = plan.key_offset.tolist()
    assert offsets == [300, -1, 0]  # request 1 (130) no longer fits after 300 + 200
    out = torch.full((key_copy_rows(plan) + 32, 2 * 16), -7.0, device=device)
    copy_keys(p["kv"], p["bt"], plan, out=out)
    k = p["k"].reshape(p["k"].shape[0], -1)
    cu_k = p["cu_k"].tolist()
    for r, off in enumerate(offsets):
        if off >= 0:
            n = cu_k[r + 1] - cu_k[r]
            torch.testing.assert_close(out[off : off + n].cpu(), k[cu_k[r] : cu_k[r + 1]], rtol=0, atol=0)
    assert (out[500:].cpu() == -7).all()  # rows past the copied requests untouched


def test_copy_keys_rejects_a_buffer_of_the_wrong_shape():
    p = make_problem(([(64, 64)], 2, 1, 16, 64, 4, 16, 16, 16), "cpu")
    with pytest.raises(ValueError, match="key copy must be contiguous"):
        copy_keys(p["kv"], p["bt"], p["plan"], out=torch.empty(8, 16))


def _tma_case(device):
    """Context before the queries, partial first / last blocks, several requests, GQA: whole
    tiles through TMA and edge tiles through the masked loads in one launch."""
    if device == "cpu":
        return ([(1000, 1600), (512, 512), (300, 1100), (20, 700)], 4, 2, 16, 64, 4, 16, 16, 32)
    return ([(5000, 7000), (4096, 4096), (700, 9000), (3000, 3001)], 8, 2, 128, 128, 8, 16, 128, 256)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_tiles_through_tma_match_the_masked_loads_and_the_reference(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(_tma_case(device), device, dtype=dtype, qscale=1.0)
    q = p["q"].to(device)
    offsets = p["plan"].key_offset.tolist()
    assert tma_supported(q, p["kv"]) and sum(o >= 0 for o in offsets) >= 2 and min(offsets) == -1
    got = antidiagonal_scores_paged(q, p["kv"], p["bt"], p["plan"])
    masked = antidiagonal_scores_paged(q, p["kv"], p["bt"], p["plan"], tma=False)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-7)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
    for a, r in zip(unpack_scores(got.cpu(), p["plan"]), ref_scores(p)):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_tiles_read_the_key_copy(device, monkeypatch):
    """The TMA path really runs: with a key copy of zeros the whole tiles' scores change (all
    their products are 0), the edge tiles' do not."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(_tma_case(device), device, dtype=dtype, qscale=1.0)
    q = p["q"].to(device)
    want = antidiagonal_scores_paged(q, p["kv"], p["bt"], p["plan"])
    real_copy = scoring.copy_keys
    monkeypatch.setattr(scoring, "copy_keys", lambda *a, **kw: real_copy(*a, **kw).zero_())
    got = antidiagonal_scores_paged(q, p["kv"], p["bt"], p["plan"])
    assert not torch.allclose(got, want)


def test_tma_needs_a_token_major_aligned_query():
    p = make_problem(([(64, 64)], 2, 1, 16, 64, 4, 16, 16, 16), "cpu")
    q, kv = p["q"], p["kv"]
    assert tma_supported(q, kv) == tma_device(q.device, q.dtype)
    assert not tma_supported(q.transpose(0, 1).contiguous().transpose(0, 1), kv)  # head-major
    assert not tma_supported(torch.empty(65 * 32 + 1)[1:].view(65, 2, 16)[:64], kv)  # base off by 4 bytes


@pytest.mark.parametrize("device", DEVICES)
def test_pool_scores_from_the_cache_when_a_plan_exceeds_its_key_copy(device):
    from vllm_xattn.backends.sparse_prefill import ScratchPool
    from vllm_xattn.config import XAttnConfig
    from vllm_xattn.kernels import key_copy_min_len

    kw = dict(max_tokens=256, max_reqs=2, num_q_heads=2, head_dim=16, dtype=torch.float32,
              cfg=XAttnConfig(block_size=64, stride=4), page_size=16, device=device, num_kv_heads=1)
    assert key_copy_min_len(4, 2, 1) == 5120
    # no request this short is ever copied: no room reserved for one
    assert ScratchPool(max_seq_len=5000, **kw).keys is None
    pool = ScratchPool(max_seq_len=6000, **kw)
    if not tma_device(device, torch.float32):
        assert pool.keys is None
        return
    assert tuple(pool.keys.shape) == (6016, 16)
    plan_kw = dict(block_size=64, stride=4, block_m=16, block_n=16)
    plan = plan_prefill([0, 128, 256], [4000, 4000], **plan_kw)
    assert plan.key_copy_rows == 8000 and not pool.key_copy_fits(plan)
    plan = plan_prefill([0, 128, 256], [4000, 4000], key_copy_capacity=pool.keys.shape[0], **plan_kw)
    assert plan.key_copy_rows == 4000 and pool.key_copy_fits(plan)


def test_scoring_restores_tritons_allocator():
    """The kernel's device-made descriptors need Triton's allocator for one launch; whatever the
    caller had set is back afterwards."""
    import triton
    from triton.runtime import _allocation

    p = make_problem(([(64, 64)], 2, 1, 16, 64, 4, 16, 16, 16), "cpu")
    sentinel = _allocation.NullAllocator()
    triton.set_allocator(sentinel)
    antidiagonal_scores_paged(p["q"], p["kv"], p["bt"], p["plan"])
    assert _allocation._allocator.get() is sentinel


def test_key_copy_min_len_follows_the_measured_break_even():
    from vllm_xattn.kernels import key_copy_min_len

    # Llama layer (32 / 8 heads): ~10K keys at S=8, ~40K at S=16 (scoring_launch_overhead_h100.json)
    assert key_copy_min_len(8, 32, 8) == 10240 and key_copy_min_len(16, 32, 8) == 40960
    # a larger GQA group shares each copied key among more query heads: pays off sooner
    assert key_copy_min_len(16, 14, 2) < key_copy_min_len(16, 32, 8) < key_copy_min_len(32, 32, 8)
    kw = dict(block_size=64, stride=4, block_m=16, block_n=16)
    plan = plan_prefill([0, 300, 364], [400, 64], key_copy_min_len=100, **kw)
    assert plan.key_offset.tolist() == [0, -1]


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_path_takes_tma_only_in_steps_that_copy_keys_or_have_their_keys(device):
    from vllm_xattn.backends.sparse_prefill import ScratchPool, SparsePrefill
    from vllm_xattn.config import XAttnConfig

    p = make_problem(_tma_case(device), device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    q, kv = p["q"].to(device), p["kv"]
    pool = ScratchPool(max_tokens=q.shape[0], max_reqs=4, max_seq_len=20000, num_q_heads=q.shape[1],
                       head_dim=q.shape[2], dtype=q.dtype, cfg=XAttnConfig(block_size=p["B"], stride=p["S"]),
                       page_size=kv.shape[2], device=device, num_kv_heads=p["hkv"])
    cu, lens = p["cu_q"], (p["cu_k"][1:] - p["cu_k"][:-1]).tolist()
    kw = dict(block_size=p["B"], stride=p["S"], key_copy_capacity=pool.keys.shape[0])
    copies = plan_prefill(cu, lens, **kw)
    none = plan_prefill(cu, lens, key_copy_min_len=10**6, **kw)
    assert copies.key_copy_rows > 0 and none.key_copy_rows == 0

    def source(plan, keys, tma):  # what SparsePrefill.run has scoring read
        return tma_key_source(q, kv, plan, keys, SparsePrefill._tma(plan, pool, tma))

    assert source(copies, None, None) == "copy" and source(none, None, None) is None
    assert source(none, None, True) == "copy" and source(copies, None, False) is None  # warm-up's forcing
    # a step that copies nothing reads a request's own keys where it has no context
    keys, no_copy = _step_keys(p, q.shape[1]), _no_copy_plan(p)
    assert no_copy.direct_key_requests == 1 and source(no_copy, keys, None) == "direct"
    assert source(no_copy, None, None) is None  # no keys handed over
    assert source(no_copy, keys, False) is None
    # a step whose copy the pool cannot hold reads the paged cache
    assert SparsePrefill._tma(replace(copies, key_copy_rows=pool.keys.shape[0] + 1), pool, None) is False


def test_serving_key_copy_is_the_builders_plan_arguments():
    from vllm_xattn.kernels import serving_key_copy

    assert serving_key_copy(8, 32, 8, 1000) == dict(key_copy_capacity=1024, key_copy_min_len=10240,
                                                     direct_keys=True)


def test_builder_plan_carries_the_key_copy_bounds():
    """plan_sparse_requests passes the builder's key-copy bounds on to the plan (relative to the
    sparse requests), and a sparse request reads its query and direct keys at its place in the
    sparse token range, past the stock request before it."""
    from vllm_xattn.backends.sparse_prefill import plan_sparse_requests
    from vllm_xattn.config import XAttnConfig

    cfg = XAttnConfig(block_size=64, stride=4, min_sparse_tokens=128)
    qsl, lens = torch.tensor([0, 1, 2, 302, 366]), torch.tensor([50, 70, 400, 200])
    split = plan_sparse_requests(qsl, lens, cfg, block_m=16, block_n=16, key_copy_capacity=1000,
                                 key_copy_min_len=300)
    plan = split.plan
    assert split.requests == [2, 3] and plan.key_offset.tolist() == [0, -1] and plan.key_copy_rows == 400
    # a decode between two sparse requests: the second reads rows 301.. of [tok_start, tok_end)
    qsl, lens = torch.tensor([0, 300, 301, 557]), torch.tensor([300, 70, 256])
    split = plan_sparse_requests(qsl, lens, cfg, block_m=16, block_n=16, direct_keys=True)
    assert split.requests == [0, 2] and split.runs == ((0, 0, 300), (301, 300, 256))
    assert split.plan.req_meta[:, 0].tolist() == [0, 301] and split.plan.direct_key_offset.tolist() == [0, 301]
    assert split.plan.row_q_start.tolist()[-1] == split.plan.num_q_tokens == 556  # packed


def _step_keys(p, hq):
    """The keys of q's own tokens as a layer gets them (``bench_common.step_keys``)."""
    return step_keys(p["kv"], p["bt"], p["cu_q"], p["cu_k"][1:] - p["cu_k"][:-1], hq)


def _no_copy_plan(p):
    lens = (p["cu_k"][1:] - p["cu_k"][:-1]).tolist()
    plan = p["plan"]
    return plan_prefill(p["cu_q"], lens, block_size=p["B"], stride=p["S"], block_m=plan.block_m,
                        block_n=plan.block_n, key_copy_min_len=10**9).to(p["kv"].device)


def test_plan_offsets_direct_keys_of_requests_without_context():
    kw = dict(block_size=64, stride=4, block_m=16, block_n=16)
    # request 0 has context, request 1 (64 keys, all its own) one whole tile, request 2 context
    plan = plan_prefill([0, 300, 364, 374], [400, 64, 5000], **kw)
    assert plan.direct_key_offset.tolist() == [-1, 300, -1] and plan.direct_key_requests == 1
    # no key tile is whole below block_n * S keys (16 * 4 = 64): nothing to read through TMA
    plan = plan_prefill([0, 48], [48], **kw)
    assert plan.direct_key_offset.tolist() == [-1] and plan.direct_key_requests == 0
    # direct_keys (the builder: scoring gets the step's keys): a step whose copies would all be
    # of requests without context copies nothing; one that copies a request with context anyway
    # copies them too (one key source per launch)
    plan = plan_prefill([0, 64, 128], [64, 64], direct_keys=True, **kw)
    assert plan.key_copy_rows == 0 and plan.direct_key_offset.tolist() == [0, 64]
    assert plan_prefill([0, 64, 128], [64, 64], **kw).key_offset.tolist() == [0, 64]
    plan = plan_prefill([0, 300, 364, 374], [400, 64, 5000], direct_keys=True, **kw)
    assert plan.key_offset.tolist() == [0, 400, -1]


@pytest.mark.parametrize("device", DEVICES)
def test_direct_keys_match_the_masked_loads_and_the_reference(device):
    """A step that copies no keys: the request without context reads its whole tiles' keys from
    the layer's own (strided) keys through TMA, the others the paged cache; same scores."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(_tma_case(device), device, dtype=dtype, qscale=1.0)
    q, plan = p["q"].to(device), _no_copy_plan(p)
    keys = _step_keys(p, q.shape[1])
    assert plan.key_copy_rows == 0 and plan.direct_key_requests == 1 and keys.stride(0) != keys.shape[1] * keys.shape[2]
    got = antidiagonal_scores_paged(q, p["kv"], p["bt"], plan, keys=keys)
    masked = antidiagonal_scores_paged(q, p["kv"], p["bt"], plan, tma=False)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-7)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
    for a, r in zip(unpack_scores(got.cpu(), plan), ref_scores(p)):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_direct_keys_are_read_for_requests_without_context_only(device):
    """With the layer's keys zeroed, only the context-free request's scores change: its whole
    tiles read them; the requests with context read the cache."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(_tma_case(device), device, dtype=dtype, qscale=1.0)
    q, plan = p["q"].to(device), _no_copy_plan(p)
    keys = _step_keys(p, q.shape[1])
    want = unpack_scores(antidiagonal_scores_paged(q, p["kv"], p["bt"], plan, keys=keys).cpu(), plan)
    got = unpack_scores(antidiagonal_scores_paged(q, p["kv"], p["bt"], plan, keys=torch.zeros_like(keys)).cpu(), plan)
    direct = [x >= 0 for x in plan.direct_key_offset.tolist()]
    assert direct.count(True) == 1
    for g, w, d in zip(got, want, direct):
        assert torch.equal(g, w) != d


def test_direct_keys_need_q_s_rows_dtype_and_tma_alignment():
    from vllm_xattn.kernels.scoring import direct_keys_usable

    p = make_problem(_tma_case("cpu"), "cpu")
    q, plan = p["q"], _no_copy_plan(p)
    keys = _step_keys(p, q.shape[1])
    assert direct_keys_usable(keys, q, plan)
    assert not direct_keys_usable(None, q, plan)
    shifted = torch.empty(keys.shape[0] * keys.stride(0) + 1)[1:].view(keys.shape[0], -1, keys.shape[2])
    assert not direct_keys_usable(shifted[:, : keys.shape[1]], q, plan)  # base off by 4 bytes
    assert not direct_keys_usable(keys[:-1], q, plan)  # not one key per query row
    assert not direct_keys_usable(keys.double(), q, plan)
    assert not direct_keys_usable(keys.transpose(1, 2).contiguous().transpose(1, 2), q, plan)  # head dim strided
    no_direct = plan_prefill([0, 100], [500], block_size=p["B"], stride=p["S"])
    assert no_direct.direct_key_requests == 0 and not direct_keys_usable(keys[:100], q[:100], no_direct)
