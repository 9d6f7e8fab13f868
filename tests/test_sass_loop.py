"""scripts/sass_loop.py (offline SASS of the scoring kernel's MMA loop): it finds the loop and
counts it. One 64-wide chunk of the 128 x 256 tile is one 64x256x16 wgmma per k16 step for each
of the two warpgroups (4 HGMMA) fed by 12 16-byte cp.async per thread (4 query, 8 key), in the
kernel as in the plain GEMM; the kernel's loop also computes the load masks and paged
addresses, which the GEMM's does not."""
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from sass_loop import mma_loop  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sass_loop.py"


def test_scoring_and_gemm_loops_have_the_tile_structure():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiles for sm_90a
    res = subprocess.run([sys.executable, str(SCRIPT), "--strides", "16"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    gemm, score = (json.loads(line) for line in res.stdout.splitlines() if line.startswith("{"))
    for rep in (gemm, score):
        assert (rep["hgmma"], rep["ldgsts"]) == (4, 12), rep
    assert score["instructions"] > gemm["instructions"] > 16


def test_mma_loop_takes_the_innermost_loop_around_the_first_hgmma():
    sass = "\n".join([
        ".L_x_0:",
        "        /*0000*/                   IMAD R1, R2, R3, R4 ;",
        ".L_x_1:",
        "        /*0010*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64], P0 ;",
        "        /*0020*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR16], R24 ;",
        "        /*0030*/               @P0 BRA `(.L_x_1) ;",
        "        /*0040*/               @P1 BRA `(.L_x_0) ;",
    ])
    assert mma_loop(sass) == dict(instructions=3, hgmma=1, ldgsts=1, opcodes={"LDGSTS": 1, "HGMMA": 1, "BRA": 1})
