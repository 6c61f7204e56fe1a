import pytest
import torch

from mixmae_core.masking import (
    mix_pairs,
    normalize_mask,
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


def test_pair_mode_draws_per_pair_and_batch_mode_shares_one():
    g = torch.Generator().manual_seed(0)
    per_pair = sample_mask(8, (7, 7), 0.5, generator=g)
    assert len({tuple(m.flatten().tolist()) for m in per_pair}) > 1
    shared = sample_mask(8, (7, 7), 0.5, mode="batch", generator=g)
    assert (shared == shared[0]).all()


def test_same_seed_same_mask():
    a = sample_mask(4, (6, 7), 0.5, generator=torch.Generator().manual_seed(3))
    b = sample_mask(4, (6, 7), 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        validate_mask_ratio(ratio)
    with pytest.raises(ValueError):
        sample_mask(2, (7, 7), ratio)


def test_unknown_mode_refused():
    with pytest.raises(ValueError, match="mask_mode"):
        sample_mask(2, (7, 7), 0.5, mode="image")


def test_normalize_mask_broadcasts_and_validates():
    m = torch.zeros(7, 7)
    m[0, :3] = 1
    out = normalize_mask(m, 3, (7, 7))
    assert out.shape == (3, 7, 7) and out.dtype == torch.bool and out[:, 0, :3].all()
    with pytest.raises(ValueError, match="shape"):
        normalize_mask(torch.zeros(2, 6, 7), 2, (7, 7))
    with pytest.raises(ValueError, match="0 or 1"):
        normalize_mask(torch.full((7, 7), 0.5), 2, (7, 7))


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
