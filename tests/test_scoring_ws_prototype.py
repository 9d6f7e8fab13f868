"""scripts/scoring_ws_prototype.py (warp-specialised Gluon scoring kernel, a diagnostic): on CPU, it compiles
for the H100 (Triton's own ptxas builds it for sm_90a) and neither partition spills at the
Llama / Qwen layer shapes; on a Hopper GPU, its scores equal the Triton kernel's (which the
interpreter tests hold to the reference) with GQA, context, partial blocks and several
requests. No CPU interpreter runs Gluon."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scoring_ws_prototype.py"


@pytest.mark.parametrize("stride, head_dim, extra", [
    (8, 128, []), (16, 128, []), (8, 64, []),
    (4, 64, ["--block-size", "64", "--page", "32", "--block-n", "128"]),
    (8, 128, ["--pingpong"]), (16, 128, ["--pingpong"]), (8, 128, ["--tma"]), (8, 128, ["--pingpong", "--tma"]),
    (8, 128, ["--pingpong", "--tma", "--block-d", "32", "--stages", "8"]),
])
def test_compiles_for_sm90a_without_spills(stride, head_dim, extra):
    # in a fresh process without TRITON_INTERPRET: Gluon does not compile under the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--compile", str(stride), str(head_dim), *extra],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["ptxas_ok"], rep["ptxas"]
    assert rep["num_warps"] == 12  # 8 compute warps (two warpgroups) + the loader warpgroup
    assert rep["shared_bytes"] <= 227 * 1024  # the H100's shared memory per block
    assert rep["spill_store_bytes"] == [0], rep["ptxas"]
    # the register split: 112 for the loader warpgroup, the rest for the compute warpgroups
    assert any(reg == "112" for _, reg in rep["setmaxnreg"]), rep["setmaxnreg"]
    if "--pingpong" in extra:  # the second compute warpgroup's own budget
        assert ["inc", "200"] in rep["setmaxnreg"]


WS_CASES = {  # (reqs [(Tq, N)], Hq, Hkv, D, B, S, page, block_m, block_n), as in test_kernels_interpret
    "gqa_ctx_partial_multi_s8": ([(1000, 3000), (2048, 2048), (77, 5000)], 8, 2, 128, 128, 8, 16, 128, 256),
    "d64_s16_multi": ([(4096, 8192), (513, 600)], 8, 1, 64, 128, 16, 16, 128, 256),
    "b64_s4_n128_p32": ([(3000, 4000)], 4, 4, 64, 64, 4, 32, 128, 128),
}


MODES = {  # antidiagonal_scores_paged_ws options
    "one-compute": {}, "pp-lag0": {"pingpong": True, "lag": 0}, "pp-lag2": {"pingpong": True, "lag": 2},
    "pp-lag3": {"pingpong": True, "lag": 3}, "tma": {"tma": True},
    "pp-lag0-tma": {"pingpong": True, "lag": 0, "tma": True},
    "pp-lag6-tma-d32": {"pingpong": True, "lag": 6, "tma": True, "block_d": 32, "num_stages": 8},
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", list(WS_CASES))
@pytest.mark.parametrize("mode", list(MODES))
def test_scores_equal_the_triton_kernel(case, mode):
    import scoring_ws_prototype as ws

    from tests.test_kernels_interpret import kernel_scores, make_problem

    p = make_problem(WS_CASES[case], "cuda", seed=1, dtype=torch.bfloat16)
    want = kernel_scores(p)
    got = ws.antidiagonal_scores_paged_ws(p["q"].cuda(), p["kv"], p["bt"], p["plan"], **MODES[mode])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
