"""2D navigation, the point robot of MAML's reinforcement-learning experiments (Finn et al. 2017, §5.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metalab.errors import ConfigError
from metalab.tasks.environments import Environment, EnvironmentFamily


@dataclass
class Nav2DEnvironment(Environment):
    """A point in the plane that starts at the origin; an action is its velocity, each axis clipped to
    [−max_speed, max_speed]; the reward of a step is minus the distance to the goal (the task's parameters (2,))
    after the move. Fixed-length episodes: ``horizon`` steps, no early end (the MAML code's ``point_env_randgoal``
    also ends within 0.01 of the goal; a fixed length keeps every rollout one tensor). Plain torch, batched."""

    horizon: int = 100
    max_speed: float = 0.1
    observation_size: int = 2
    action_size: int = 2

    def vector(self, parameters: Tensor, seeds: Sequence[int]) -> _PointRobots:
        return _PointRobots(parameters, self.max_speed)


class _PointRobots:
    """N point robots, goals (N, 2); the start is deterministic, so the seeds are not needed."""

    def __init__(self, goals: Tensor, max_speed: float) -> None:
        self.goals, self.max_speed = goals.float(), max_speed
        self.position = torch.zeros_like(self.goals)

    def reset(self) -> Tensor:
        self.position = torch.zeros_like(self.goals)
        return self.position.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor]:
        self.position = self.position + actions.clamp(-self.max_speed, self.max_speed)  # (N, 2)
        return self.position.clone(), -torch.linalg.vector_norm(self.position - self.goals, dim=-1)


class Nav2D(EnvironmentFamily):
    """Tasks: goals uniform in [goal_min, goal_max]²; each a :class:`Nav2DEnvironment` of ``horizon`` steps.

    The paper says "the unit square"; its code (cbfinn/maml_rl, ``point_env_randgoal.py``) draws goals in
    [−0.5, 0.5]², the default here. ``observation_size``, ``action_size``, ``kwargs``: :class:`EnvironmentFamily`'s.
    """

    name = "nav2d"

    def __init__(self, *, goal_min: float = -0.5, goal_max: float = 0.5, horizon: int = 100, max_speed: float = 0.1,
                 observation_size: int = 2, action_size: int = 2, **kwargs: Any) -> None:
        if goal_min > goal_max:
            raise ConfigError(f"task.goal_min must be <= task.goal_max, got {goal_min} > {goal_max}")
        if horizon < 1 or max_speed <= 0:
            raise ConfigError(f"task.horizon must be >= 1 and task.max_speed > 0, got {horizon} and {max_speed}")
        self.environment = Nav2DEnvironment(horizon=horizon, max_speed=max_speed)
        self.ranges = {"goal_x": (goal_min, goal_max), "goal_y": (goal_min, goal_max)}
        super().__init__(observation_size=observation_size, action_size=action_size, **kwargs)
