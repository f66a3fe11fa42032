"""Pendulum swing-up with per-task physics: Gymnasium's ``PendulumEnv`` (classic control) in its vector API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import Tensor

from metalab.errors import ConfigError
from metalab.tasks.environments import Environment, EnvironmentFamily, GymnasiumVector

if TYPE_CHECKING:
    from gymnasium.envs.classic_control.pendulum import PendulumEnv


@dataclass
class PendulumEnvironment(Environment):
    """Gymnasium's ``PendulumEnv`` (gymnasium/envs/classic_control/pendulum.py): observation (cos θ, sin θ, θ̇),
    action a torque clipped to [−2, 2], reward −(θ² + 0.1 θ̇² + 0.001 u²); a task's parameters (3,) are its
    gravity ``g``, mass ``m`` and length ``l``. ``horizon`` steps (gymnasium's registered ``Pendulum-v1``: 200)."""

    horizon: int = 200
    observation_size: int = 3
    action_size: int = 1

    def vector(self, parameters: Tensor, seeds: Sequence[int]) -> GymnasiumVector:
        from gymnasium.vector import SyncVectorEnv  # here: every job imports metalab.tasks, few step a pendulum

        return GymnasiumVector(SyncVectorEnv([partial(_pendulum, *map(float, row)) for row in parameters.tolist()]),
                                list(seeds))


def _pendulum(g: float, m: float, l: float) -> PendulumEnv:  # noqa: E741 (gymnasium's names)
    from gymnasium.envs.classic_control.pendulum import PendulumEnv

    env = PendulumEnv(g=g)
    env.m, env.l = m, l  # PendulumEnv takes only g; m and l are attributes its step reads
    return env


class Pendulum(EnvironmentFamily):
    """Tasks: a pendulum whose gravity, mass and length are uniform in their ranges (Gymnasium's defaults are
    g = 10, m = l = 1). ``observation_size``, ``action_size``, ``kwargs``: :class:`EnvironmentFamily`'s."""

    name = "pendulum"

    def __init__(self, *, gravity_min: float = 5.0, gravity_max: float = 15.0, mass_min: float = 0.5,
                 mass_max: float = 1.5, length_min: float = 0.5, length_max: float = 1.5, horizon: int = 200,
                 observation_size: int = 3, action_size: int = 1, **kwargs: Any) -> None:
        self.ranges = {"gravity": (gravity_min, gravity_max), "mass": (mass_min, mass_max),
                       "length": (length_min, length_max)}
        for key, (low, high) in self.ranges.items():
            if not 0 < low <= high:
                raise ConfigError(f"task.{key}_min must be > 0 and <= task.{key}_max, got {low} and {high}")
        if horizon < 1:
            raise ConfigError(f"task.horizon must be >= 1, got {horizon}")
        self.environment = PendulumEnvironment(horizon=horizon)
        super().__init__(observation_size=observation_size, action_size=action_size, **kwargs)
