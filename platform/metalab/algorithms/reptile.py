"""Reptile: move the initialisation towards the weights each task's inner loop reaches.

Reference: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from metalab.algorithms.base import LossFn, MetaAlgorithm
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Episodes


class Reptile(MetaAlgorithm):
    """Per task, a copy of the model takes ``inner_steps`` steps of ``inner_optimizer`` (SGD or Adam with
    β₁ = 0, as the paper) on the support set, reaching φᵢ. No query loss is differentiated: the outer
    "gradient" is θ − mean(φᵢ), which the meta-optimiser applies. With ``optimizer=sgd optimizer.lr=ε``
    that is the paper's θ ← θ + ε·(mean(φᵢ) − θ); the ``reptile`` config selects SGD with ε = 1.

    Lightning runs it with manual optimisation (``autograd_meta_gradient = False``).
    """

    autograd_meta_gradient = False

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 eval_inner_steps: int | None = None, inner_optimizer: Literal["sgd", "adam"] = "sgd") -> None:
        super().__init__()
        if inner_lr <= 0 or inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1):
            raise ConfigError(f"algorithm.inner_lr must be > 0 and inner_steps, eval_inner_steps >= 1; got "
                              f"{inner_lr}, {inner_steps}, {eval_inner_steps}")
        if inner_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"algorithm.inner_optimizer must be sgd or adam, got {inner_optimizer!r}")
        self.network = model
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.inner_optimizer = inner_optimizer

    @property
    def model(self) -> nn.Module:
        return self.network

    def adapt(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn, training: bool) -> nn.Module:
        learner = copy.deepcopy(self.network)
        parameters = list(learner.parameters())
        optimizer = (torch.optim.SGD(parameters, lr=self.inner_lr) if self.inner_optimizer == "sgd"
                     else torch.optim.Adam(parameters, lr=self.inner_lr, betas=(0.0, 0.999)))
        with torch.enable_grad():
            for _ in range(self.inner_steps if training else self.eval_inner_steps):
                optimizer.zero_grad()
                loss_fn(learner(support_x), support_y).backward()
                optimizer.step()
        return learner

    def write_meta_gradient(self, tasks: Episodes, loss_fn: LossFn) -> list[Tensor]:
        initial = list(self.network.parameters())
        directions = [torch.zeros_like(p) for p in initial]
        predictions = []
        for index in range(len(tasks)):
            learner = self.adapt(tasks.support_x[index], tasks.support_y[index], loss_fn, training=True)
            for direction, start, reached in zip(directions, initial, learner.parameters(), strict=True):
                direction += (start.detach() - reached.detach()) / len(tasks)
            with torch.no_grad():
                predictions.append(learner(tasks.query_x[index]))
        for parameter, direction in zip(initial, directions, strict=True):
            parameter.grad = direction
        return predictions
