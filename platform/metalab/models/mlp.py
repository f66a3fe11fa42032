"""Fully connected network, split into a feature extractor and a head (ANIL adapts the head only)."""

from __future__ import annotations

from torch import Tensor, nn

from metalab.errors import ConfigError


class MLP(nn.Module):
    """``in_features → hidden_sizes… → out_features`` with ReLU between layers.

    MAML's sinusoid network is ``MLP(1, [40, 40], 1)`` (Finn et al. 2017, §5.1).
    """

    def __init__(self, in_features: int = 1, hidden_sizes: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if in_features < 1 or out_features < 1 or any(size < 1 for size in hidden_sizes):
            raise ConfigError(
                f"model sizes must be >= 1, got in_features={in_features}, hidden_sizes={hidden_sizes}, "
                f"out_features={out_features}"
            )
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
