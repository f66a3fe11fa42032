"""Gaussian MLP policy: MAML's policy for reinforcement learning (Finn et al. 2017, §5.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metalab.errors import ConfigError
from metalab.models.mlp import MLP


class GaussianMLPPolicy(MLP):
    """π(a | s) = N(μ(s), diag(exp(log_std))²): μ an MLP ``observation_size → hidden_sizes… → action_size`` with
    ReLU, ``log_std`` (A,) a parameter independent of the state (rllab's ``GaussianMLPPolicy``, which MAML's code
    uses: hidden 100-100 ReLU, initial std 1).

    ``forward(observations (…, O)) -> (mean (…, A), log_std (…, A))``.
    """

    def __init__(self, observation_size: int = 2, action_size: int = 2, hidden_sizes: tuple[int, ...] = (100, 100),
                 init_log_std: float = 0.0) -> None:
        if observation_size < 1 or action_size < 1 or any(size < 1 for size in hidden_sizes):
            raise ConfigError(f"model sizes must be >= 1, got observation_size={observation_size}, "
                              f"hidden_sizes={list(hidden_sizes)}, action_size={action_size}")
        super().__init__(observation_size, hidden_sizes, action_size)  # μ: features (the hidden layers) and head
        self.log_std = nn.Parameter(torch.full((action_size,), float(init_log_std)))

    def forward(self, observations: Tensor) -> tuple[Tensor, Tensor]:
        mean = super().forward(observations)
        return mean, self.log_std.expand_as(mean)
