"""Masks, pairs and patches: the geometry every pretraining method shares, and what its step returns.

Conventions used throughout the project:

* Rows ``2k`` and ``2k+1`` of a batch are partners (pair ``k``): the data pipeline delivers
  images in pairs for every method, and draws the masks of a pair from the pair's seed
  (``MaskSpec.draw``), so a resumed run sees the same masks.
* A method takes one boolean mask per row, ``(B, h, w)`` on its own grid (MixMAE and
  SimMIM: stride-32 units; MAE and BEiT: the ViT's patches). ``True`` means the row's own
  token there is hidden from it: MixMAE shows the partner's token instead (so both rows of
  a pair carry the same map, and the two mixed inputs are complementary: every token of
  both images is visible exactly once), SimMIM and BEiT a [MASK] token, MAE drops it.
* MixMAE's map is also the attention group of every token of a mixed input: group 0
  tokens come from the row's own image, group 1 from its partner; attention never crosses
  groups.
* A patch vector (``patchify``) is ordered (row, column, channel), as MAE's and the
  official MixMAE code's reconstruction targets.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

MaskMode = Literal["pair", "batch"]
MaskLayout = Literal["shared", "random", "blocks"]


def validate_mask_ratio(ratio: float) -> float:
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {ratio}")
    return float(ratio)


def num_hidden(grid_size: tuple[int, int], ratio: float) -> int:
    """Number of positions a random mask hides (MixMAE: takes from the partner): ``floor(L * r)``."""
    h, w = grid_size
    k = int(h * w * validate_mask_ratio(ratio))
    if not 0 < k < h * w:
        raise ValueError(
            f"mask_ratio {ratio} hides {k} of the {h}x{w} mask units; it must hide at least one and not all"
        )
    return k


def sample_mask(
    count: int, grid_size: tuple[int, int], ratio: float = 0.5, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``count`` independent ``(h, w)`` masks with exactly ``floor(h*w*ratio)`` positions set each,
    on the CPU (also under a meta-device context: FLOP counts draw real masks)."""
    if count < 1:
        raise ValueError(f"need at least one mask, got {count}")
    h, w = grid_size
    k = num_hidden(grid_size, ratio)
    ranks = torch.rand(count, h * w, generator=generator, device="cpu").argsort(dim=1).argsort(dim=1)
    return (ranks < k).view(count, h, w)


#: BEiT's blockwise masking at its 14x14 grid: blocks of at least 16 patches, aspect ratio
#: (height / width) between 0.3 and 1 / 0.3
BEIT_GRID_AREA, BEIT_MIN_BLOCK, BEIT_MIN_ASPECT = 196, 16, 0.3


def blockwise_sizes(grid_size: tuple[int, int], ratio: float) -> tuple[int, int]:
    """(positions to cover, smallest block) of BEiT's masking on ``grid_size``; refused where
    not even one block fits."""
    h, w = grid_size
    target = round(h * w * validate_mask_ratio(ratio))
    min_block = max(1, round(BEIT_MIN_BLOCK * h * w / BEIT_GRID_AREA))
    if not min_block <= target < h * w:
        raise ValueError(
            f"mask_ratio {ratio} masks {target} of the {h}x{w} patches in blocks of at least {min_block}; "
            "it must mask at least one block and not all"
        )
    return target, min_block


def draw_blocks(
    grid_size: tuple[int, int], target: int, min_block: int, rng: random.Random, min_aspect: float = BEIT_MIN_ASPECT
) -> list[tuple[int, int, int, int]]:
    """BEiT's masking generator: rectangles ``(top, left, h, w)`` added one after another until
    ``target`` positions are covered, never more.

    Each rectangle has an area drawn between ``min_block`` and what is left to cover, and an
    aspect ratio drawn log-uniformly in ``[min_aspect, 1 / min_aspect]``; it is kept if it covers
    at least one new position and no more than are left (it may overlap the ones before).
    Failed tries in a row end the mask, so it may fall a little short of ``target``.

    BEiT's own generator lets the last blocks shrink below the minimum (its area draw reaches
    below it once fewer positions are left) and keeps rectangles whose rounded sides leave the
    aspect bounds; here both count as failed tries, so every block keeps the minimum size and
    the aspect bounds. The last blocks then have to overlap the ones before, which takes more
    tries: 30 a block where BEiT gives 10, so the masks cover about as much as BEiT's.
    """
    H, W = grid_size
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    covered = [[False] * W for _ in range(H)]
    blocks, count = [], 0
    while count < target:
        left_to_cover = target - count
        for _ in range(30):
            area = rng.uniform(min_block, max(min_block, left_to_cover))
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h * w < min_block or not min_aspect <= h / w <= 1 / min_aspect or h >= H or w >= W:
                continue
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            new = sum(not covered[i][j] for i in range(top, top + h) for j in range(left, left + w))
            if 0 < new <= left_to_cover:
                for i in range(top, top + h):
                    covered[i][left : left + w] = [True] * w
                blocks.append((top, left, h, w))
                count += new
                break
        else:
            break
    return blocks


def blockwise_mask(grid_size: tuple[int, int], ratio: float, rng: random.Random) -> torch.Tensor:
    """One BEiT mask ``(h, w)``: blocks cover about ``round(L * ratio)`` positions (BEiT: 75
    of 196 at 224 px), with the minimum block scaled to the grid's area."""
    target, min_block = blockwise_sizes(grid_size, ratio)
    mask = torch.zeros(grid_size, dtype=torch.bool, device="cpu")
    for top, left, h, w in draw_blocks(grid_size, target, min_block, rng):
        mask[top : top + h, left : left + w] = True
    return mask


@dataclass(frozen=True)
class MaskSpec:
    """How the data pipeline draws the masks of one pair unit (rows 2k and 2k+1) from its seed,
    on the CPU, without the model: picklable, and the same masks for the same seed.

    ``layout``: ``"shared"`` (MixMAE) one map of ``floor(L*r)`` units for both rows, drawn as
    ``sample_mask(1, grid, ratio)`` from ``torch.Generator().manual_seed(seed)``; ``"random"``
    (SimMIM, MAE) ``floor(L*r)`` positions per image, independently; ``"blocks"`` (BEiT)
    blockwise masks per image (``blockwise_mask``).
    """

    grid: tuple[int, int]
    ratio: float
    layout: MaskLayout

    def __post_init__(self) -> None:
        """A ratio the grid cannot draw is refused here, when the model is built (at config load)."""
        if self.layout not in ("shared", "random", "blocks"):
            raise ValueError(f"mask layout must be 'shared', 'random' or 'blocks', got {self.layout!r}")
        object.__setattr__(self, "grid", tuple(int(n) for n in self.grid))
        (blockwise_sizes if self.layout == "blocks" else num_hidden)(self.grid, self.ratio)

    def draw(self, seed: int) -> torch.Tensor:
        """The pair's masks, bool ``(2, h, w)``: row 2k's, then row 2k+1's."""
        if self.layout == "blocks":
            rng = random.Random(seed)
            return torch.stack([blockwise_mask(self.grid, self.ratio, rng) for _ in range(2)])
        generator = torch.Generator().manual_seed(seed)
        masks = sample_mask(1 if self.layout == "shared" else 2, self.grid, self.ratio, generator=generator)
        return masks.expand(2, *self.grid).clone()

    def draw_rows(self, seeds: Sequence[int]) -> torch.Tensor:
        """A batch's masks ``(2 * len(seeds), h, w)``, one pair unit per seed."""
        return torch.cat([self.draw(seed) for seed in seeds])


def check_masks(masks: torch.Tensor, images: torch.Tensor, grid_size: tuple[int, int]) -> None:
    """Refuse masks that are not one bool map per row on the method's grid, or an odd batch."""
    B = images.shape[0]
    if B % 2:
        raise ValueError(
            f"pretraining batches come in pairs (rows 2k and 2k+1), so the batch size must be even; got {B}"
        )
    if masks.dtype != torch.bool or tuple(masks.shape) != (B, *grid_size):
        raise ValueError(
            f"masks must be bool (B, h, w) = {(B, *grid_size)}, one per row as the method's MaskSpec draws them; "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )


@dataclass
class PretrainOutput:
    """What every method's ``model(images, masks)`` returns."""

    loss: torch.Tensor
    """Scalar training loss."""
    pred: torch.Tensor
    """The method's predictions (its docstring gives their shape)."""
    masks: torch.Tensor
    """``(B, h, w)`` bool: the masks the step used, on the images' device (MixMAE with
    ``mask_mode: batch``: the first pair's for every row)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra scalars to log (BEiT: ``masked_token_acc``), detached."""


def pair_rows(pair_values: torch.Tensor) -> torch.Tensor:
    """Repeat per-pair values for both rows of each pair: ``(P, ...) -> (2P, ...)``."""
    return pair_values.repeat_interleave(2, dim=0)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """Exchange rows ``2k`` and ``2k+1``: row ``b`` of the result is ``b``'s partner."""
    return x.unflatten(0, (-1, 2)).flip(1).flatten(0, 1)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of a ``(N, h, w)`` bool map to ``(N, *size)``."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].to(torch.uint8), size=size, mode="nearest")[:, 0].bool()


def mix_pairs(tokens: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Mix NHWC tokens of partners: where ``row_mask`` is set a row shows its partner's token."""
    return torch.where(row_mask[..., None], swap_pairs(tokens), tokens)


def mix_images(images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The mixed inputs: where ``groups`` ``(B, h, w)`` is set, row b shows its partner's pixels.

    ``images`` are NCHW with sides a multiple of the grid's; the groups are upsampled to pixels.
    """
    pixels = upsample_mask(groups.to(images.device, non_blocking=True), tuple(images.shape[-2:]))[:, None]
    return torch.where(pixels, swap_pairs(images), images)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, patch * patch * C)``, each vector ordered (row, col, channel)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, grid_size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    B = patches.shape[0]
    h, w = grid_size
    x = patches.reshape(B, h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * patch, w * patch)


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased variance, as MAE and the official MixMAE code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return mean, std


def norm_pix_target(images: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """Pixels patchified at ``patch``; with ``norm_pix`` normalised per patch (unbiased variance)."""
    target = patchify(images.float(), patch)
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    return target
