"""scripts/bench_selection.py (CPU): its float64 threshold rule, which classifies the rows where
the kernel and the reference disagree as rounding ties, must be the reference's rule."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_selection import rows_differing, threshold_masks_f64  # noqa: E402

from vllm_xattn import reference as ref  # noqa: E402


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.95, 1.0])
def test_float64_rule_is_the_reference_rule_on_exact_values(tau):
    # Masses on a 1/8 grid (many ties): float32 and float64 sums are exact, so both rules
    # must keep the same blocks, ties and all-zero rows included.
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n_kb = int(torch.randint(2, 40, (), generator=g))
        n_qb = int(torch.randint(1, n_kb + 1, (), generator=g))
        a = torch.round(torch.rand(3, n_qb, n_kb, generator=g) ** 4 * 8) / 8
        i = torch.arange(n_kb - n_qb, n_kb)[None, :, None]
        a = torch.where(torch.arange(n_kb)[None, None, :] <= i, a, 0.0)
        assert rows_differing(threshold_masks_f64([a], tau), ref.select_blocks([a], threshold=tau)) == 0


def test_float64_rule_sees_a_crossing_that_float32_rounds_away():
    # Query block 3: forced sink (1) and diagonal (3 * 2^-24), optional block 1 (1 + 2^-22)
    # and block 2 (0); tau 0.5. Block 1 is kept iff the forced mass < tau * total. Exactly:
    # 1 + 3 * 2^-24 < 0.5 * (2 + 7 * 2^-24), kept. In float32 the forced mass rounds to
    # 1 + 2^-22 (a tie, to even) and the total to 2 + 2^-21: 1 + 2^-22 < 1 + 2^-22 fails.
    a = torch.tensor([[[1.0, 1.0 + 2.0 ** -22, 0.0, 3 * 2.0 ** -24]]])
    assert threshold_masks_f64([a], 0.5)[0][0, 0].tolist() == [True, True, False, True]
    assert ref.select_blocks([a], threshold=0.5)[0][0, 0].tolist() == [True, False, False, True]
