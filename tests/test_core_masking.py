import pickle

import pytest
import torch

from mixmae_core.masking import (
    MaskSpec,
    check_masks,
    mix_pairs,
    pair_rows,
    sample_mask,
    swap_pairs,
    upsample_mask,
    validate_mask_ratio,
)
from mixmae_core.encoders.swin import level_windows


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.99])
def test_mask_has_floor_L_r_mixed_units(ratio):
    g = torch.Generator().manual_seed(0)
    mask = sample_mask(16, (7, 7), ratio, generator=g)
    assert mask.shape == (16, 7, 7) and mask.dtype == torch.bool
    assert (mask.flatten(1).sum(1) == int(49 * ratio)).all()


def test_same_seed_same_mask():
    a = sample_mask(4, (6, 7), 0.5, generator=torch.Generator().manual_seed(3))
    b = sample_mask(4, (6, 7), 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_mixmae_spec_draws_the_pair_masks_the_data_pipeline_always_drew():
    """One map per pair unit, for both rows, exactly ``sample_mask(1, ...)`` from the unit's seed."""
    spec = MaskSpec((7, 7), 0.5, "shared")
    for seed in (0, 7, 12345):
        drawn = spec.draw(seed)
        expected = sample_mask(1, (7, 7), 0.5, generator=torch.Generator().manual_seed(seed))[0]
        assert drawn.shape == (2, 7, 7) and torch.equal(drawn[0], expected) and torch.equal(drawn[1], expected)


@pytest.mark.parametrize("layout,grid,ratio", [("shared", (7, 7), 0.5), ("random", (7, 7), 0.6), ("random", (14, 14), 0.75),
                                               ("blocks", (14, 14), 75 / 196), ("blocks", (8, 8), 0.4)])
def test_mask_specs_are_deterministic_per_seed_and_picklable(layout, grid, ratio):
    spec = MaskSpec(grid, ratio, layout)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert torch.equal(spec.draw(3), spec.draw(3)) and not torch.equal(spec.draw(3), spec.draw(4))
    rows = spec.draw_rows([3, 4])
    assert rows.shape == (4, *grid) and rows.dtype == torch.bool and torch.equal(rows[2:], spec.draw(4))
    if layout == "random":  # each image its own floor(L * r) positions
        assert (rows.flatten(1).sum(1) == int(grid[0] * grid[1] * ratio)).all()
        assert not torch.equal(rows[0], rows[1])


def test_a_ratio_the_grid_cannot_draw_is_refused_when_the_spec_is_made():
    with pytest.raises(ValueError, match="hides 0 of the 2x2 mask units"):
        MaskSpec((2, 2), 0.1, "shared")
    with pytest.raises(ValueError, match="must mask at least one block"):
        MaskSpec((14, 14), 0.05, "blocks")


def test_masks_must_be_one_bool_map_per_row_and_batches_even():
    images = torch.zeros(4, 3, 64, 64)
    check_masks(torch.zeros(4, 2, 2, dtype=torch.bool), images, (2, 2))
    with pytest.raises(ValueError, match=r"bool \(B, h, w\) = \(4, 2, 2\)"):
        check_masks(torch.zeros(2, 2, 2, dtype=torch.bool), images, (2, 2))
    with pytest.raises(ValueError, match="must be even"):
        check_masks(torch.zeros(3, 2, 2, dtype=torch.bool), images[:3], (2, 2))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        validate_mask_ratio(ratio)
    with pytest.raises(ValueError):
        sample_mask(2, (7, 7), ratio)


def test_swap_pairs_and_mix_follow_row_convention():
    tokens = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 2, 1)
    assert swap_pairs(torch.arange(6)).tolist() == [1, 0, 3, 2, 5, 4]
    mask = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    mixed = mix_pairs(tokens, pair_rows(mask))
    # row 0 shows row 1's token where pair 0's mask is set; row 1 the complement image
    assert mixed[0, 0, 0, 0] == 1 and mixed[0, 1, 1, 0] == 0
    assert mixed[1, 0, 0, 0] == 0 and mixed[1, 1, 1, 0] == 1
    assert mixed[3, 1, 1, 0] == 2 and mixed[2, 1, 1, 0] == 3


@pytest.mark.parametrize(
    "img_size,windows", [(224, (14, 14, 14, 7)), (192, (12, 12, 12, 6)), (384, (16, 16, 24, 12)), (64, (8, 8, 8, 8))]
)
def test_no_merge_window_spans_two_images(img_size, windows):
    """Every 2x2 patch merge at every stage sees one segment only, so merges never mix images."""
    geometry = level_windows((img_size, img_size), 4, windows)
    coarse = geometry[-1][0]
    mask = sample_mask(8, coarse, 0.5, generator=torch.Generator().manual_seed(1))
    for res, _ in geometry[:-1]:
        up = upsample_mask(mask, res)
        quads = up.view(8, res[0] // 2, 2, res[1] // 2, 2).permute(0, 1, 3, 2, 4).flatten(3)
        assert (quads == quads[..., :1]).all(), f"a 2x2 merge at {res} spans two images"
        # and the upsampling is the coarse mask itself, unit by unit
        factor = res[0] // coarse[0]
        assert torch.equal(up[:, ::factor, ::factor], mask)
