"""Reptile: move the initialisation towards the weights each task's inner loop reaches.

Reference: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from metalab.algorithms.base import Context, MetaAlgorithm, TaskGradient
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task


class Reptile(MetaAlgorithm):
    """Per task, a copy of the model takes ``inner_steps`` steps of ``inner_optimizer`` (SGD or Adam with
    β₁ = 0, as the paper) on the support set, reaching φᵢ. No query loss is differentiated: a task's
    meta-gradient is θ − φᵢ, the runner averages them and the meta-optimiser applies θ − mean(φᵢ). With
    ``optimizer=sgd optimizer.lr=ε`` that is the paper's θ ← θ + ε·(mean(φᵢ) − θ); the ``reptile`` config
    selects SGD with ε = 1.
    """

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

    def adapt(self, task: Task, context: Context) -> nn.Module:
        learner = copy.deepcopy(self.network)
        parameters = list(learner.parameters())
        optimizer = (torch.optim.SGD(parameters, lr=self.inner_lr) if self.inner_optimizer == "sgd"
                     else torch.optim.Adam(parameters, lr=self.inner_lr, betas=(0.0, 0.999)))
        steps = context.inner_steps or (self.inner_steps if context.training else self.eval_inner_steps)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                context.loss_fn(learner(task.support_x), task.support_y).backward()
                optimizer.step()
        return learner

    def task_meta_gradient(self, task: Task, context: Context) -> TaskGradient:
        """θ − φ: the initialisation minus the weights this task's inner loop reached."""
        learner = self.adapt(task, context)
        with torch.no_grad():
            prediction = learner(task.query_x)
            direction = tuple(start - reached for start, reached in
                              zip(self.meta_parameters(), learner.parameters(), strict=True))
        return TaskGradient(prediction, context.loss_fn(prediction, task.query_y), direction)
