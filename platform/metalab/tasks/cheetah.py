"""Half-cheetah locomotion with a goal per task, MAML's MuJoCo experiments (Finn et al. 2017, §5.3).

Gymnasium's ``HalfCheetah-v5`` (MuJoCo) stepped in its vector API, with the rewards of the MAML code
(github.com/cbfinn/maml_rl: rllab's ``half_cheetah_env_rand.py`` and ``half_cheetah_env_rand_direc.py``), computed
here from each step's forward velocity, not HalfCheetah-v5's own (forward weight 1, control cost 0.1·‖a‖²):

- ``task=cheetah_vel``: a goal velocity v* ~ U[0, 2] per task; reward −|v − v*| − 0.05·‖a‖²;
- ``task=cheetah_dir``: a direction d ∈ {−1, +1} per task (forward or backward, each with probability ½); reward
  d·v − 0.05·‖a‖².

a is the action clipped to the actuators' range [−1, 1] (as rllab clips it before the control cost; the simulation
clips it too), 200 steps an episode (the paper's). Where metalab differs from the MAML code: v is HalfCheetah-v5's
``x_velocity`` (the root's x displacement over the step's dt = 0.05 s), where rllab reads the torso's centre-of-mass
velocity at the end of the step; the observation is v5's 17 numbers (joint positions without the root's x, and
velocities), where rllab's has 20 (it adds the torso's centre-of-mass position); the initial state is v5's (uniform
noise of ±0.1 on positions, normal noise of 0.1 on velocities), seeded per episode.

MuJoCo is imported when a family is prepared, at the run's start (only cheetah runs pay for it); where it cannot start,
``prepare`` raises :class:`~metalab.errors.SimulatorMissingError`, one line.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metalab.errors import ConfigError, SimulatorMissingError, one_line
from metalab.tasks.environments import Environment, EnvironmentFamily, EnvironmentTasks, GymnasiumVector

if TYPE_CHECKING:
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    from gymnasium.vector import SyncVectorEnv

CONTROL_COST = 0.05  # rllab's 1e-1 · 0.5 · ‖a‖²
INSTALL = ".venv/bin/pip install mujoco==4.0.0 (pinned in requirements/lock.txt)"


@dataclass
class CheetahEnvironment(Environment):
    """HalfCheetah-v5 with the MAML code's reward for ``goal`` (``velocity`` or ``direction``); a task's
    parameters (1,) are its goal velocity or its direction (±1). ``horizon`` steps an episode."""

    goal: str = "velocity"
    horizon: int = 200
    observation_size: int = 17
    action_size: int = 6

    def vector(self, parameters: Tensor, seeds: Sequence[int]) -> CheetahVector:
        from gymnasium.vector import SyncVectorEnv  # here: every job imports metalab.tasks, few run a cheetah

        half_cheetah()
        return CheetahVector(SyncVectorEnv([_make] * len(parameters)), list(seeds),
                             self.goal, parameters[:, 0].float().cpu())


def _make() -> HalfCheetahEnv:
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    return HalfCheetahEnv()


class CheetahVector(GymnasiumVector):
    """N half-cheetahs, task n's goal ``targets[n]`` (a velocity, or a direction ±1); the reward of a step is the
    MAML code's, from the velocity the environment reports (``info["x_velocity"]``) and the clipped action."""

    def __init__(self, envs: SyncVectorEnv, seeds: list[int], goal: str, targets: Tensor) -> None:
        super().__init__(envs, seeds)
        self.goal, self.targets = goal, targets

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor]:
        clipped = actions.detach().cpu().clamp(-1.0, 1.0)  # (N, 6): the actuators' ctrlrange
        observations, _, _, _, info = self.envs.step(clipped.numpy())
        return torch.from_numpy(observations).float(), reward(self.goal, self.targets,
                                                              torch.from_numpy(info["x_velocity"]).float(), clipped)


def reward(goal: str, targets: Tensor, velocity: Tensor, action: Tensor) -> Tensor:
    """The MAML code's reward (N,): −|v − v*| − 0.05‖a‖² (``velocity``), or d·v − 0.05‖a‖² (``direction``);
    ``targets`` (N,) v* or d, ``velocity`` (N,), ``action`` (N, A) already clipped."""
    control = CONTROL_COST * action.pow(2).sum(-1)
    if goal == "velocity":
        return -(velocity - targets).abs() - control
    return targets * velocity - control


def _mujoco_warning(text: str) -> None:
    """MuJoCo's warnings, once they pass this filter, as Python warnings (its default handler prints to stderr and
    appends to ./MUJOCO_LOG.TXT, for every environment built). Gymnasium 1.4.0's half_cheetah.xml uses the
    compiler attribute ``settotalmass``, which MuJoCo 4 deprecates but still applies: that one is dropped."""
    if "settotalmass" not in text:
        warnings.warn(f"MuJoCo: {text.strip()}", RuntimeWarning, stacklevel=1)


@cache  # once a process: the family checks at start, each vector() again (a sampling worker is another process)
def half_cheetah() -> None:
    """Check that MuJoCo starts here (imports, and one HalfCheetah-v5 builds) and route its warnings
    (:func:`_mujoco_warning`); raise SimulatorMissingError, one line, if it does not start."""
    try:
        import mujoco
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

        mujoco.set_mju_user_warning(_mujoco_warning)
        HalfCheetahEnv().close()
    except Exception as error:  # ImportError, gymnasium's DependencyNotInstalled, a library MuJoCo cannot load, ...
        raise SimulatorMissingError(f"the half-cheetah tasks need MuJoCo (Gymnasium's HalfCheetah-v5), which cannot "
                                    f"start here: {one_line(error)}; install it with {INSTALL}, or choose "
                                    "task=nav2d or task=pendulum") from None


class Cheetah(EnvironmentFamily):
    """A half-cheetah with a goal per task (:attr:`goal`: ``velocity`` or ``direction``), its parameter drawn from
    :attr:`ranges` (set by the subclass before this ``__init__``). ``observation_size``, ``action_size``,
    ``kwargs``: :class:`EnvironmentFamily`'s."""

    goal: str

    def __init__(self, *, horizon: int = 200, observation_size: int = 17, action_size: int = 6,
                 **kwargs: Any) -> None:
        if horizon < 1:
            raise ConfigError(f"task.horizon must be >= 1, got {horizon}")
        self.environment = CheetahEnvironment(goal=self.goal, horizon=horizon)
        super().__init__(observation_size=observation_size, action_size=action_size, **kwargs)

    def prepare(self) -> None:
        """Check that MuJoCo starts, so that where it does not the run stops at its start, in one line (exit status
        3, as a missing data set), not at its first rollout."""
        half_cheetah()


class CheetahVelocity(Cheetah):
    """``task=cheetah_vel``: a goal velocity per task, v* ~ U[velocity_min, velocity_max] (the paper: [0, 2])."""

    name = "cheetah_vel"
    goal = "velocity"

    def __init__(self, *, velocity_min: float = 0.0, velocity_max: float = 2.0, horizon: int = 200,
                 observation_size: int = 17, action_size: int = 6, **kwargs: Any) -> None:
        if velocity_min > velocity_max:
            raise ConfigError(f"task.velocity_min must be <= task.velocity_max, got {velocity_min} > {velocity_max}")
        self.ranges = {"goal_velocity": (velocity_min, velocity_max)}
        super().__init__(horizon=horizon, observation_size=observation_size, action_size=action_size, **kwargs)


class CheetahDirection(Cheetah):
    """``task=cheetah_dir``: a direction per task, forward (+1) or backward (−1), each with probability ½."""

    name = "cheetah_dir"
    goal = "direction"

    def __init__(self, *, horizon: int = 200, observation_size: int = 17, action_size: int = 6,
                 **kwargs: Any) -> None:
        self.ranges = {"direction": (0.0, 1.0)}  # u ~ U[0, 1), made −1 below ½ and +1 from ½ (sample)
        super().__init__(horizon=horizon, observation_size=observation_size, action_size=action_size, **kwargs)

    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> EnvironmentTasks:
        tasks = super().sample(num_tasks, generator, split)
        tasks.parameters = torch.where(tasks.parameters < 0.5, -1.0, 1.0)
        return tasks
