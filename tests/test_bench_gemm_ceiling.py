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
def test_all_heads_gemms_row_sums_in_every_load_and_order():
    H, KV, M, K, BM, BN, BK = 4, 2, 64, 64, 16, 32, 16
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(H, M, K, generator=gen), torch.randn(KV, M, K, generator=gen)  # fp32: exact here
    out = torch.zeros(H, M, M // BN)
    want = torch.stack([a[h] @ b[h // 2].T for h in range(H)]).view(H, M, M // BN, BN).sum(-1)
    launchers = g.heads_gemm_launchers(a, b, out, BM, BN, BK)
    assert list(launchers) == [(False, True), (False, False), (True, True), (True, False)]  # ncu_scoring's order
    for case, launch in launchers.items():
        out.zero_()
        launch()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-3, msg=lambda m: f"{case}: {m}")
