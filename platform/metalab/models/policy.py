"""Gaussian MLP policy: MAML's policy for reinforcement learning (Finn et al. 2017, §5.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metalab.errors import ConfigError


class GaussianMLPPolicy(nn.Module):
    """π(a | s) = N(μ(s), diag(exp(log_std))²): μ an MLP ``observation_size → hidden_sizes… → action_size`` with
    ReLU, ``log_std`` (A,) a parameter independent of the state (rllab's ``GaussianMLPPolicy``, which MAML's code
    uses: hidden 100-100 ReLU, initial std 1).

    ``forward(observations (…, O)) -> (mean (…, A), log_std (…, A))``.
    """

    def __init__(self, observation_size: int = 2, action_size: int = 2, hidden_sizes: tuple[int, ...] = (100, 100),
                 init_log_std: float = 0.0) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if observation_size < 1 or action_size < 1 or any(size < 1 for size in hidden_sizes):
            raise ConfigError(f"model sizes must be >= 1, got observation_size={observation_size}, "
                              f"hidden_sizes={hidden_sizes}, action_size={action_size}")
        layers: list[nn.Module] = []
        width = observation_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, action_size)
        self.log_std = nn.Parameter(torch.full((action_size,), float(init_log_std)))

    def forward(self, observations: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.head(self.features(observations))
        return mean, self.log_std.expand_as(mean)
