"""scripts/scoring_ws_prototype.py (warp-specialised Gluon scoring kernel): on CPU, it compiles
for the H100 (Triton's own ptxas builds it for sm_90a) and neither partition spills at the
Llama / Qwen layer shapes; on a Hopper GPU, its scores equal the Triton kernel's (which the
interpreter tests hold to the reference) with GQA, context, partial blocks and several
requests. No CPU interpreter runs Gluon."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "bt_ptr": "*i32", "a_ptr": "*fp32", "scr_p_ptr": "*fp32",
            "scr_m_ptr": "*fp32", "tiles_ptr": "*i32", "req_ptr": "*i32", "queue_ptr": "*i32"}
ALIGNED = ("s_qt", "s_qh", "s_kp", "s_kh", "s_kn", "s_ah", "s_ar")


@pytest.mark.parametrize("stride, head_dim", [(8, 128), (16, 128), (8, 64)])
def test_compiles_for_sm90a_without_spills(tmp_path, stride, head_dim):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    import scoring_ws_prototype as ws

    params = list(inspect.signature(ws._score_ws_kernel.fn).parameters)
    consts = dict(S=stride, D=head_dim, B=128, PAGE=16, BLOCK_M=128, BLOCK_N=256, NUM_STAGES=4, LOADER_REGS=112)
    sig = {p: POINTERS.get(p) or ("constexpr" if p in consts else "fp32" if p == "qk_scale" else "i32")
           for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in POINTERS or p in ALIGNED}
    src = GluonASTSource(fn=ws._score_ws_kernel, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    assert k.metadata.num_warps == 12  # 8 compute warps + the loader warpgroup
    assert k.metadata.shared <= 227 * 1024  # the H100's shared memory per block
    ptx = tmp_path / "k.ptx"
    ptx.write_text(k.asm["ptx"])
    ptxas = Path(triton.backends.nvidia.__path__[0]) / "bin" / "ptxas"
    res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert re.findall(r"(\d+) bytes spill stores", res.stderr) == ["0"], res.stderr
    # the partitions' register split: 112 for the loader, the rest for the two compute warpgroups
    assert ("inc", "112") in re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", k.asm["ptx"])


WS_CASES = {  # (reqs [(Tq, N)], Hq, Hkv, D, B, S, page, block_m, block_n), as in test_kernels_interpret
    "gqa_ctx_partial_multi_s8": ([(1000, 3000), (2048, 2048), (77, 5000)], 8, 2, 128, 128, 8, 16, 128, 256),
    "d64_s16_multi": ([(4096, 8192), (513, 600)], 8, 1, 64, 128, 16, 16, 128, 256),
    "b64_s4_n128_p32": ([(3000, 4000)], 4, 4, 64, 64, 4, 32, 128, 128),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", list(WS_CASES))
def test_scores_equal_the_triton_kernel(case):
    import scoring_ws_prototype as ws

    from tests.test_kernels_interpret import kernel_scores, make_problem

    p = make_problem(WS_CASES[case], "cuda", seed=1, dtype=torch.bfloat16)
    want = kernel_scores(p)
    got = ws.antidiagonal_scores_paged_ws(p["q"].cuda(), p["kv"], p["bt"], p["plan"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
