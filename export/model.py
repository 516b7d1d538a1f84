"""The trained network: backbone → pooled features → classifier head and embedding head.

Both heads read the same pooled penultimate features (SF300: one network gives a class and
a global descriptor), and they are exported as three ONNX graphs so the appliance can swap
the classifier without touching the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedder(nn.Module):
    """Linear projection of features, L2-normalised: the retrieval descriptor."""

    def __init__(self, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=1)


class TerratileNet(nn.Module):
    """Backbone plus classifier and embedder heads, trained together."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: int,
                 embedding_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, n_classes)
        self.embedder = Embedder(feature_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images → (features, logits, embedding)."""
        features = self.backbone(x)
        return features, self.classifier(features), self.embedder(features)


class ProxyLoss(nn.Module):
    """Normalised-softmax proxy loss on the embedding (one learnable proxy per class).

    Cosine similarities to the class proxies, divided by a temperature, go through softmax
    cross-entropy (single-label) or a per-class sigmoid (multi-label): a metric loss that
    needs no pair mining and works with small batches on a CPU.
    """

    def __init__(self, n_classes: int, embedding_dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(n_classes, embedding_dim) * 0.1)
        self.temperature = temperature

    def forward(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = embedding @ F.normalize(self.proxies, dim=1).T / self.temperature
        if target.ndim == 2:
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target)
