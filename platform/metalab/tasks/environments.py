"""Reinforcement-learning tasks: a task is an environment (its per-task parameters), not a data set.

A meta-batch is :class:`EnvironmentTasks`: the (T, P) parameters of T environments (a goal, a pendulum's gravity,
mass and length), a seed per task, and the :class:`Environment` that steps them. The algorithm collects its own
rollouts from it (:func:`metalab.algorithms.policy_gradient.sample_rollouts`): K episodes of every task at once, as
one vectorised environment of T·K copies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from metalab.errors import ConfigError
from metalab.tasks.base import TaskFamily

if TYPE_CHECKING:
    from gymnasium.vector import SyncVectorEnv


class VectorEnvironment(Protocol):
    """N environments stepped as one: ``reset() -> (N, O)``; ``step(actions (N, A)) -> (observations (N, O),
    rewards (N,))``, float32 tensors. Episodes have a fixed length (:attr:`Environment.horizon`) and never end early."""

    def reset(self) -> Tensor: ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor]: ...


class Environment(ABC):
    """The dynamics of a family, shared by its tasks: sizes, episode length, and a vectorised environment for given
    per-environment parameters. Plain data (picklable), so it travels in a meta-batch."""

    observation_size: int
    action_size: int
    horizon: int  # steps per episode

    @abstractmethod
    def vector(self, parameters: Tensor, seeds: Sequence[int]) -> VectorEnvironment:
        """N environments, environment n with ``parameters[n]`` (N, P), its initial state drawn from ``seeds[n]``."""


@dataclass
class EnvironmentTask:
    """One task: ``parameters`` (P,), ``seed`` (its rollouts' randomness), ``environment``."""

    parameters: Tensor
    seed: int
    environment: Environment


@dataclass
class EnvironmentTasks:
    """A meta-batch of T environment tasks: ``parameters`` (T, P), ``seeds`` (T,) int64, one ``environment``.

    ``tasks[i]`` is an :class:`EnvironmentTask`, ``tasks[a:b]`` a smaller meta-batch; :meth:`of` stacks tasks.
    """

    parameters: Tensor
    seeds: Tensor
    environment: Environment
    source: str | None = None  # as Episodes': environment families evaluate one source

    @classmethod
    def of(cls, tasks: Sequence[EnvironmentTask]) -> EnvironmentTasks:
        return cls(torch.stack([task.parameters for task in tasks]),
                   torch.tensor([task.seed for task in tasks], dtype=torch.int64), tasks[0].environment)

    def __len__(self) -> int:
        return len(self.parameters)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, int):
            return EnvironmentTask(self.parameters[index], int(self.seeds[index]), self.environment)
        return EnvironmentTasks(self.parameters[index], self.seeds[index], self.environment)

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EnvironmentTasks:
        """The parameters on ``device``; seeds stay on the CPU (they seed CPU generators)."""
        return EnvironmentTasks(self.parameters.to(device, non_blocking=non_blocking), self.seeds, self.environment)


class EnvironmentFamily(TaskFamily):
    """A family of environments differing by a few parameters, each task's drawn uniformly from ``ranges``.

    Subclasses set :attr:`environment` and :attr:`ranges` (parameter name → (low, high)), in the order of the
    parameters' columns, before calling this ``__init__``. Validation and test tasks are fixed by ``eval_seed`` as
    every family's.

    Arguments:
        observation_size, action_size: the environment's, stated in the YAML so that a policy is sized from the task
            (``${task.observation_size}``) as other models are; checked against the environment.
        kwargs: :class:`~metalab.tasks.base.TaskFamily`'s.
    """

    problem = "reinforcement"
    batch_type = EnvironmentTasks
    environment: Environment
    ranges: dict[str, tuple[float, float]]
    generator_parameters = ("ranges", "horizon")
    observation_size: int
    action_size: int

    def __init__(self, *, observation_size: int, action_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        actual = (self.environment.observation_size, self.environment.action_size)
        if (observation_size, action_size) != actual:
            raise ConfigError(f"task {self.name}'s environment has observations of size {actual[0]} and actions of "
                              f"size {actual[1]}, not {observation_size} and {action_size}: set "
                              f"task.observation_size={actual[0]} task.action_size={actual[1]}")
        self.observation_size, self.action_size = actual

    @property
    def horizon(self) -> int:
        return self.environment.horizon

    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> EnvironmentTasks:
        low, high = (torch.tensor(bounds, dtype=torch.float32) for bounds in zip(*self.ranges.values(), strict=True))
        parameters = low + (high - low) * torch.rand((num_tasks, len(self.ranges)), generator=generator)  # (T, P)
        seeds = torch.randint(0, 2**62, (num_tasks,), generator=generator)
        return EnvironmentTasks(parameters, seeds, self.environment)


class GymnasiumVector:
    """A gymnasium ``SyncVectorEnv`` as tensors (observations and rewards float32; environment n reset with
    ``seeds[n]``). Its environments are built directly, without ``gymnasium.make``'s time limit wrapper, and never
    terminate, so it never auto-resets within ``horizon``."""

    def __init__(self, envs: SyncVectorEnv, seeds: list[int]) -> None:
        self.envs, self.seeds = envs, seeds

    def reset(self) -> Tensor:
        observations, _ = self.envs.reset(seed=self.seeds)
        return torch.from_numpy(observations).float()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor]:
        observations, rewards, *_ = self.envs.step(actions.detach().cpu().numpy().astype(np.float32))
        return torch.from_numpy(observations).float(), torch.from_numpy(rewards).float()
