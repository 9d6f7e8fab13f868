"""scripts/sass_loop.py (offline SASS of the scoring kernel's MMA loop): it finds the loop and
counts it. One 64-wide chunk of the 128 x 256 tile is one 64x256x16 wgmma per k16 step for each
of the two warpgroups (4 HGMMA) fed by 12 16-byte cp.async per thread (4 query, 8 key), in the
kernel's edge-tile loop as in the plain GEMM, which also computes the load masks and paged
addresses that the GEMM's does not; its whole-tile loop takes one TMA box of each operand."""
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from sass_loop import mma_loop, mma_loops  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sass_loop.py"


def test_scoring_and_gemm_loops_have_the_tile_structure():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiles for sm_90a
    res = subprocess.run([sys.executable, str(SCRIPT), "--strides", "16"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    gemm, whole, edge = (json.loads(line) for line in res.stdout.splitlines() if line.startswith("{"))
    for rep in (gemm, edge):
        assert (rep["hgmma"], rep["ldgsts"], rep["tma"]) == (4, 12, 0), rep
    # whole tiles: one TMA box of query and one of keys per chunk, no cp.async
    assert (whole["hgmma"], whole["ldgsts"], whole["tma"]) == (4, 0, 2), whole
    assert edge["instructions"] > whole["instructions"] > gemm["instructions"] > 16
    # both loops' load rings fit the H100's 227 KB of shared memory per block
    assert whole["shared_bytes"] == edge["shared_bytes"] <= 232448


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
    assert mma_loop(sass) == dict(instructions=3, hgmma=1, ldgsts=1, tma=0,
                                  opcodes={"LDGSTS": 1, "HGMMA": 1, "BRA": 1})


def test_mma_loops_lists_each_loop_once_in_code_order():
    sass = "\n".join([
        ".L_x_0:",
        "        /*0000*/                   UTMALDG.2D [UR8], [UR4] ;",
        "        /*0010*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR16], R24 ;",
        "        /*0020*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR20], R24 ;",
        "        /*0030*/               @P0 BRA `(.L_x_0) ;",
        ".L_x_1:",
        "        /*0040*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64], P0 ;",
        "        /*0050*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR16], R24 ;",
        "        /*0060*/               @P1 BRA `(.L_x_1) ;",
    ])
    tma, masked = mma_loops(sass)
    assert (tma["instructions"], tma["hgmma"], tma["tma"], tma["ldgsts"]) == (4, 2, 1, 0)
    assert (masked["instructions"], masked["hgmma"], masked["tma"], masked["ldgsts"]) == (3, 1, 0, 1)
