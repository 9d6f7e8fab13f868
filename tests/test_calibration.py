"""Threshold calibration (vllm_xattn.calibration) on small synthetic prompts (CPU)."""
import torch

from vllm_xattn import reference as ref
from vllm_xattn.calibration import calibrate_layer, true_block_mass


def _prompt(n=640, hq=4, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, hkv, d, generator=g)
    q = torch.randn(n, hq, d, generator=g)
    q[:, 0] *= 4.0  # a peaky head (sparse attention) next to flat ones
    return q, k


def test_true_block_mass_is_the_exact_softmax_pooled_per_block():
    q, k = _prompt()
    mass, row_block = true_block_mass(q, k, [1, 4], block_size=64)
    assert mass.shape == (4, 128, 10) and row_block.tolist() == [1] * 64 + [4] * 64
    torch.testing.assert_close(mass.sum(-1), torch.ones(4, 128))
    # row 300 (block 4), head 3 (kv head 1), against a direct softmax
    s = (q[300, 3] @ k[:301, 1].T) * 32 ** -0.5
    p = torch.nn.functional.pad(s.softmax(-1), (0, 640 - 301)).view(10, 64).sum(-1)
    torch.testing.assert_close(mass[3, 64 + 300 - 256], p)


def test_calibration_picks_the_smallest_threshold_reaching_the_target():
    q, k = _prompt()
    grid = (0.5, 0.7, 0.9, 0.99, 1.0)
    got = calibrate_layer(q, k, target=0.9, stride=4, block_size=64, sample_blocks=3, grid=grid)
    assert len(got["thresholds"]) == 4
    mass, rb = true_block_mass(q, k, [7, 8, 9], block_size=64)
    scores = ref.antidiagonal_block_scores(q, k, torch.tensor([0, 640]), torch.tensor([0, 640]),
                                           stride=4, block_size=64)[0]
    for h, tau in enumerate(got["thresholds"]):
        kept = lambda t: float((mass[h] * ref.select_blocks([scores], threshold=t)[0][h][rb]).sum(-1).mean())
        assert kept(tau) >= 0.9 or tau == 1.0
        assert got["kept_mass"][h] == kept(tau)
        lower = [t for t in grid if t < tau]
        assert not lower or kept(lower[-1]) < 0.9  # minimal on the grid
    # threshold 1.0 keeps every causal block: density 1
    dense = calibrate_layer(q, k, target=1.01, stride=4, block_size=64, sample_blocks=3, grid=grid)
    assert dense["thresholds"] == [1.0] * 4 and all(abs(x - 1) < 1e-6 for x in dense["density"])
