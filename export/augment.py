"""Remote-sensing augmentations on batched tensors: multi-scale crops, flips, rot90.

Overhead imagery has no "up", so all eight dihedral transforms are valid; random resized
crops across scales mimic the appliance's multi-scale windows (56/112/224 px co-centred
patches resized to the network input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_resized_crops(batch: torch.Tensor, size: int, scale: tuple[float, float],
                         generator: torch.Generator) -> torch.Tensor:
    """Square crops covering ``scale`` (area fraction) of each chip, resized to ``size``."""
    n, _, h, w = batch.shape
    out = []
    for i in range(n):
        area = float(torch.empty(1).uniform_(*scale, generator=generator))
        side = max(4, min(h, w, round((area * h * w) ** 0.5)))
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
        crop = batch[i : i + 1, :, top : top + side, left : left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False))
    return torch.cat(out)


def dihedral(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip and a random multiple of 90° per chip."""
    out = batch.clone()
    for i in range(batch.shape[0]):
        x = out[i]
        if bool(torch.randint(0, 2, (1,), generator=generator)):
            x = x.flip(-1)
        x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=generator)), dims=(-2, -1))
        out[i] = x
    return out


def augment(batch: torch.Tensor, size: int, generator: torch.Generator,
            scale: tuple[float, float] = (0.35, 1.0)) -> torch.Tensor:
    """Training view of a batch of [N,C,H,W] chips: crop across scales, then flip/rotate."""
    return dihedral(random_resized_crops(batch, size, scale, generator), generator)
