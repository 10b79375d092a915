"""DINOv2's masks for the iBOT objective: BEiT-style block masks over the patch grid of the global crops.

:func:`block_mask` draws one crop's mask: rectangles of area U(min_block, budget) and aspect ratio log-uniform in
[min_aspect, 1/min_aspect], each placed uniformly (strictly narrower and lower than the grid) and accepted only if it
adds at least one new patch without exceeding the remaining budget; at most 10 tries per rectangle, and the mask stops
growing (it may undershoot) when no try succeeds. :func:`batch_masks` masks a batch of crops as DINOv2's collate
does: of the n crops, int(n · probability) get a mask, crop i of them int(N · U(r_i, r_{i+1})) patches with the ratio
range cut in equal strata r, the other crops none, the order shuffled. Every draw uses the given ``torch.Generator``
(or the global RNG), so that a checkpoint's RNG state replays the masks exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

MAX_TRIES = 10
MIN_BLOCK = 4  # smallest rectangle area drawn (DINOv2's min_num_patches)
MIN_ASPECT = 0.3


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


def block_mask(height: int, width: int, n_masked: int, *, max_block: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(height, width) bool mask with at most ``n_masked`` patches set, grown one rectangle at a time (module
    docstring); ``max_block`` caps each rectangle's area budget (DINOv2: half the patches)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    max_block = height * width if max_block is None else max_block
    log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_block)
        added = 0
        for _ in range(MAX_TRIES):
            area = _uniform(MIN_BLOCK, budget, generator)
            aspect = math.exp(_uniform(*log_aspect, generator))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = _randint(height - h, generator), _randint(width - w, generator)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


class BatchMasks(NamedTuple):
    """The masks of a batch of crops and what the iBOT loss needs from them.

    masks: (n, N) bool, crop-major like the crops. weights: (M,) fp32, 1 / (masked patches of the crop) for each of
    the M masked patches in row-major order. indices: (M,) int64 flat indices of the masked patches into (n·N).
    """

    masks: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


def batch_masks(n_crops: int, grid: tuple[int, int], ratio: tuple[float, float], probability: float, *,
                generator: torch.Generator | None = None) -> BatchMasks:
    """Masks for ``n_crops`` crops of a ``grid`` = (h, w) patch grid, as DINOv2's collate draws them (module
    docstring): ``ratio`` = (min, max) fraction of masked patches, ``probability`` = fraction of crops masked."""
    height, width = grid
    n_patches = height * width
    n_masked_crops = int(n_crops * probability)
    strata = torch.linspace(ratio[0], ratio[1], n_masked_crops + 1).tolist()
    masks = [block_mask(height, width, int(n_patches * _uniform(strata[i], strata[i + 1], generator)),
                        max_block=int(0.5 * n_patches), generator=generator).flatten()
             for i in range(n_masked_crops)]
    masks += [torch.zeros(n_patches, dtype=torch.bool)] * (n_crops - n_masked_crops)
    order = torch.randperm(n_crops, generator=generator)
    stacked = torch.stack(masks)[order]
    counts = stacked.sum(-1, keepdim=True).clamp(min=1)
    weights = (1.0 / counts).expand_as(stacked)[stacked].float()
    return BatchMasks(stacked, weights, stacked.flatten().nonzero().flatten())
