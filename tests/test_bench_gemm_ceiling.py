"""scripts/bench_gemm_ceiling.py: the all-heads GEMMs (pointer and TMA loads, both program orders)
compute every head's row sums of A B^T (GQA: GROUP query heads per key head), in the interpreter."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_gemm_ceiling as g  # noqa: E402


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU variant (Triton interpreter)")
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("heads_inner", [True, False])
def test_all_heads_gemm_row_sums(tma, heads_inner):
    from triton.tools.tensor_descriptor import TensorDescriptor

    H, KV, M, K, BM, BN, BK = 4, 2, 64, 64, 16, 32, 16
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(H, M, K, generator=gen), torch.randn(KV, M, K, generator=gen)  # fp32: exact here
    out = torch.zeros(H, M, M // BN)
    grid = (H * (M // BM) * (M // BN),)
    if tma:
        g._gemm_rowsum_heads_tma[grid](
            TensorDescriptor.from_tensor(a.view(H * M, K), [BM, BK]),
            TensorDescriptor.from_tensor(b.view(KV * M, K), [BN, BK]),
            out, K, H, H // KV, M, M // BM, M // BN, BM=BM, BN=BN, BK=BK, HEADS_INNER=heads_inner)
    else:
        g._gemm_rowsum_heads[grid](a, b, out, K, H, H // KV, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                   M // BM, M // BN, BM=BM, BN=BN, BK=BK, HEADS_INNER=heads_inner)
    want = torch.stack([a[h] @ b[h // 2].T for h in range(H)]).view(H, M, M // BN, BN).sum(-1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-3)
