"""Remote-sensing augmentations of one chip: multi-scale crops, flips, rot90.

Overhead imagery has no "up", so all eight dihedral transforms are valid; random resized
crops across scales mimic the appliance's multi-scale windows (56/112/224 px co-centred
patches resized to the network input). They run per chip inside the data-loader workers,
each chip with its own generator, so a chip's view depends only on (seed, epoch, index):
the same with any number of workers, ranks, or after a resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(chips: torch.Tensor, size: int) -> torch.Tensor:
    """A [C,H,W] chip or a [N,C,H,W] batch resized to ``size`` x ``size`` (bilinear,
    antialiased): the evaluation view, the whole chip at the network input."""
    if chips.shape[-2:] == (size, size):
        return chips
    batch = chips if chips.ndim == 4 else chips[None]
    out = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out if chips.ndim == 4 else out[0]


def random_resized_crop(chip: torch.Tensor, size: int, scale: tuple[float, float],
                        generator: torch.Generator) -> torch.Tensor:
    """A square crop covering ``scale`` (area fraction) of the chip, resized to ``size``."""
    h, w = chip.shape[-2:]
    area = float(torch.empty(1).uniform_(*scale, generator=generator))
    side = max(4, min(h, w, round((area * h * w) ** 0.5)))
    top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
    return resize(chip[:, top : top + side, left : left + side], size)


def dihedral(chip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip and a random multiple of 90°."""
    if bool(torch.randint(0, 2, (1,), generator=generator)):
        chip = chip.flip(-1)
    return torch.rot90(chip, int(torch.randint(0, 4, (1,), generator=generator)), dims=(-2, -1))


def augment(chip: torch.Tensor, size: int, generator: torch.Generator,
            scale: tuple[float, float] = (0.35, 1.0)) -> torch.Tensor:
    """Training view of a [C,H,W] chip: crop across scales, then flip/rotate."""
    return dihedral(random_resized_crop(chip, size, scale, generator), generator).contiguous()
