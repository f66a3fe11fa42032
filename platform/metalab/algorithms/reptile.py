"""Reptile: move the initialisation towards the weights each task's inner loop reaches.

Reference: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018; the authors' code,
github.com/openai/supervised-reptile (``reptile.py``, ``models.py``), settles what the text leaves open.
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

    ``carry_inner_state`` (Adam only): the inner Adam's moments and step count carry over from one training
    task to the next and across meta-iterations, as in the authors' code, which resets only the trainable
    variables after each task (``VariableState`` of ``tf.trainable_variables()``; Adam's slots are not among
    them). Evaluation starts from the carried state and leaves it as it was (the code restores every variable
    after an evaluation task). The state is in buffers (``inner_adam``), so a checkpoint resumes it. Each task
    then depends on the one before: ``sequential_tasks`` is set, and the runner runs such an algorithm with
    the loop only (``runner.backend=threads`` or ``vmap`` is refused; ``auto`` chooses the loop).

    Example (what the runner does per task)::

        meta_gradient = reptile.task_meta_gradient(task, context).gradient   # θ − φ, one per parameter
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 eval_inner_steps: int | None = None, inner_optimizer: Literal["sgd", "adam"] = "sgd",
                 carry_inner_state: bool = False) -> None:
        super().__init__()
        if inner_lr <= 0 or inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1):
            raise ConfigError(f"algorithm.inner_lr must be > 0 and inner_steps, eval_inner_steps >= 1; got "
                              f"{inner_lr}, {inner_steps}, {eval_inner_steps}")
        if inner_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"algorithm.inner_optimizer must be sgd or adam, got {inner_optimizer!r}")
        if carry_inner_state and inner_optimizer != "adam":
            raise ConfigError("algorithm.carry_inner_state=true carries the inner Adam's moments, and inner SGD has "
                              "none: set algorithm.inner_optimizer=adam or algorithm.carry_inner_state=false")
        self.network = model
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.inner_optimizer = inner_optimizer
        self.carry_inner_state = self.sequential_tasks = carry_inner_state
        if carry_inner_state:  # Adam's state per parameter of the model, by name (dots are not allowed in buffers)
            self.inner_adam = nn.Module()
            self.inner_adam.register_buffer("step", torch.zeros((), dtype=torch.long))  # kept by .half()
            for name, parameter in model.named_parameters():
                for moment in ("exp_avg", "exp_avg_sq"):
                    self.inner_adam.register_buffer(f"{name.replace('.', '-')}-{moment}", torch.zeros_like(parameter))

    @property
    def model(self) -> nn.Module:
        return self.network

    def adapt(self, task: Task, context: Context) -> nn.Module:
        learner = copy.deepcopy(self.network)
        named = list(learner.named_parameters())
        parameters = [parameter for _, parameter in named]
        optimizer = (torch.optim.SGD(parameters, lr=self.inner_lr) if self.inner_optimizer == "sgd"
                     else torch.optim.Adam(parameters, lr=self.inner_lr, betas=(0.0, 0.999)))
        if self.carry_inner_state:
            self._load_inner_state(optimizer, named)
        steps = context.inner_steps or (self.inner_steps if context.training else self.eval_inner_steps)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                context.loss_fn(learner(task.support_x), task.support_y).backward()
                optimizer.step()
        if self.carry_inner_state and context.training:
            self._store_inner_state(optimizer, named)
        return learner

    def _load_inner_state(self, optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]) -> None:
        """Start ``optimizer`` (Adam) from the carried moments and step count (copies: evaluation must not
        write them)."""
        step = torch.tensor(float(self.inner_adam.step))  # Adam keeps its step as a CPU float tensor
        for name, parameter in named:
            key = name.replace(".", "-")
            optimizer.state[parameter] = {"step": step.clone(),
                                          "exp_avg": self.inner_adam.get_buffer(f"{key}-exp_avg").clone(),
                                          "exp_avg_sq": self.inner_adam.get_buffer(f"{key}-exp_avg_sq").clone()}

    @torch.no_grad()
    def _store_inner_state(self, optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]) -> None:
        """Keep the moments and step count the task's inner loop ended with, for the next task."""
        for name, parameter in named:
            key, state = name.replace(".", "-"), optimizer.state[parameter]
            self.inner_adam.get_buffer(f"{key}-exp_avg").copy_(state["exp_avg"])
            self.inner_adam.get_buffer(f"{key}-exp_avg_sq").copy_(state["exp_avg_sq"])
        self.inner_adam.step.fill_(int(max(optimizer.state[p]["step"] for _, p in named)))

    def task_meta_gradient(self, task: Task, context: Context) -> TaskGradient:
        """θ − φ: the initialisation minus the weights this task's inner loop reached."""
        learner = self.adapt(task, context)
        with torch.no_grad():
            prediction = learner(task.query_x)
            direction = tuple(start - reached for start, reached in
                              zip(self.meta_parameters(), learner.parameters(), strict=True))
        return TaskGradient(prediction, context.loss_fn(prediction, task.query_y), direction)
