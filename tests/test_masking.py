"""DINOv2's block masks (dino.masking): budgets, shapes, strata, weights and replay from the RNG."""

import pytest
import torch

from dino.masking import batch_masks, block_mask


@pytest.mark.parametrize("grid,n_masked", [((14, 14), 40), ((14, 14), 98), ((4, 4), 3), ((6, 9), 20)])
def test_block_mask_stays_within_its_budget(grid, n_masked):
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = block_mask(*grid, n_masked, max_block=grid[0] * grid[1] // 2, generator=generator)
        assert mask.shape == grid and mask.dtype == torch.bool
        assert 0 < int(mask.sum()) <= n_masked  # DINOv2's masks may undershoot, never overshoot


def test_block_mask_of_zero_patches_is_empty():
    assert not block_mask(5, 5, 0).any()


def test_batch_masks_follow_dinov2s_collate():
    generator = torch.Generator().manual_seed(3)
    n_crops, grid, ratio = 16, (10, 10), (0.1, 0.5)
    out = batch_masks(n_crops, grid, ratio, 0.5, generator=generator)
    counts = out.masks.sum(-1)
    assert out.masks.shape == (n_crops, 100)
    assert int((counts > 0).sum()) <= 8 and int((counts == 0).sum()) >= 8  # int(16 * 0.5) crops get a mask
    assert int(counts.max()) <= 50  # at most the top of the ratio range
    # One weight per masked patch, row-major: 1 / (masked patches of its crop); indices into the flat (n·N) grid.
    assert out.indices.tolist() == out.masks.flatten().nonzero().flatten().tolist()
    crop_of_patch = out.indices // 100
    torch.testing.assert_close(out.weights, 1.0 / counts[crop_of_patch].float())
    assert out.weights.sum().item() == pytest.approx(int((counts > 0).sum()))


def test_batch_masks_are_stratified_then_shuffled():
    """Crop i of the masked ones targets a ratio drawn in [r_i, r_{i+1}]: over many draws the sorted counts rise
    stratum by stratum, and the masked crops are not always the first ones."""
    generator = torch.Generator().manual_seed(4)
    firsts = set()
    for _ in range(30):
        out = batch_masks(8, (20, 20), (0.1, 0.5), 1.0, generator=generator)
        counts = sorted(out.masks.sum(-1).tolist())
        assert counts[-1] <= 200 and counts[0] >= 1
        firsts.add(int(out.masks.sum(-1).argmax()))
    assert len(firsts) > 1


def test_batch_masks_replay_from_the_rng_state():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = batch_masks(6, (7, 7), (0.1, 0.5), 0.5)
    torch.set_rng_state(state)
    second = batch_masks(6, (7, 7), (0.1, 0.5), 0.5)
    assert torch.equal(first.masks, second.masks)
    assert not torch.equal(first.masks, batch_masks(6, (7, 7), (0.1, 0.5), 0.5).masks)
