"""What the core tests share: seeded images, each image's own encoder features read out of the
mixed rows, and the isolation check (does an image's output change when its partner's does)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mixmae_core.masking import pair_rows, sample_mask, swap_pairs


def seeded_images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def own_features(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, its encoder features at every coarse position, from whichever mixed row
    holds them (the partner's row where the pair's ``mask`` is set)."""
    return torch.where(pair_rows(mask)[..., None], swap_pairs(z), z)


def partner_leaks(model: nn.Module, size: int = 64) -> bool:
    """Whether changing image 1 changes its partner image 0's prediction or features under a
    MixMAE ``model`` (in eval mode) at ``size`` px. Asserts that image 1's own features do
    change, so that a model blind to its input cannot pass for one that keeps images apart."""
    mask = sample_mask(2, (size // 32, size // 32), 0.5, generator=torch.Generator().manual_seed(1))
    images = seeded_images(size=size)
    changed = images.clone()
    changed[1] = torch.randn(3, size, size)
    with torch.no_grad():
        out, out_changed = model(images, pair_rows(mask)), model(changed, pair_rows(mask))
        features = own_features(model.forward_encoder(images, pair_rows(mask)), mask)
        features_changed = own_features(model.forward_encoder(changed, pair_rows(mask)), mask)
    assert not torch.allclose(features[1], features_changed[1], atol=1e-3)  # the change itself was seen
    same_prediction = torch.allclose(out.pred[0], out_changed.pred[0], atol=1e-5)
    return not (same_prediction and torch.allclose(features[0], features_changed[0], atol=1e-5))
