"""scripts/probe_scoring_variants.py rewrites kernels/scoring.py by text substitution: each
variant must still find its text in the kernel (an edit of the kernel that breaks a variant
fails here, not on the GPU), and the variants that keep the scores must match the kernel."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from probe_scoring_variants import SRC, VARIANTS, load_variant  # noqa: E402

from tests.test_kernels_interpret import make_problem  # noqa: E402
from vllm_xattn.kernels import scoring  # noqa: E402


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_substitutions_apply(name):
    src = SRC.read_text()
    for old, _ in VARIANTS[name]:
        assert old in src, f"{name}: kernels/scoring.py no longer contains {old[:60]!r}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU variant (Triton interpreter)")
@pytest.mark.parametrize("name", ["no-load-masks", "q-last-k-first", "heads-outer", "flat-tma"])
def test_score_keeping_variants_match_the_kernel_on_whole_tiles(name):
    # one request of whole scoring tiles: the load masks are all true, so dropping them is exact;
    # cache hints and the work order change no value
    p = make_problem(([(512, 512)], 2, 1, 16, 64, 4, 16, 16, 16), "cpu")
    want = scoring.antidiagonal_scores_paged(p["q"], p["kv"], p["bt"], p["plan"])
    got = load_variant(name).antidiagonal_scores_paged(p["q"], p["kv"], p["bt"], p["plan"])
    torch.testing.assert_close(got, want)
