"""Policy-gradient pieces shared by meta-RL algorithms: batched policies, rollouts, a linear baseline, advantages.

A *batched policy* holds one set of parameters per task: a dict name → (T, *shape) tensor over a policy module
(``forward(observations) -> (mean, log_std)``, :class:`~metalab.models.GaussianMLPPolicy`), evaluated by
``torch.func.vmap`` over tasks. Adapted policies differ per task; the unadapted one is the meta-parameters
repeated T times, so that autograd gives each task its own gradient.

References: Williams 1992 (REINFORCE); Duan et al. 2016, "Benchmarking Deep RL for Continuous Control" (rllab's
``LinearFeatureBaseline``, the baseline of MAML's code); Schulman et al. 2016 (GAE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalab.tasks.environments import Environment

Parameters = dict[str, Tensor]  # name → (T, *shape): one policy per task
BatchedPolicy = Callable[[Tensor], tuple[Tensor, Tensor]]  # observations (T, N, O) → mean, log_std (T, N, A)


def repeated(module: nn.Module, tasks: int) -> Parameters:
    """The module's parameters, one copy per task (differentiable: each task's gradient lands on its copy)."""
    return {name: p.unsqueeze(0).repeat(tasks, *(1,) * p.dim()) for name, p in module.named_parameters()}


def batched_policy(module: nn.Module, parameters: Parameters) -> BatchedPolicy:
    """``module`` with task t's parameters on task t's observations: (T, N, O) → (mean, log_std), each (T, N, A)."""
    def policy(observations: Tensor) -> tuple[Tensor, Tensor]:
        return vmap(lambda own, each: functional_call(module, own, (each,)))(parameters, observations)
    return policy


@dataclass
class Rollouts:
    """K episodes of H steps for each of T tasks: ``observations`` (T, K, H, O) (the state each action was taken
    in), ``actions`` (T, K, H, A) (as sampled, before the environment clips them), ``rewards`` (T, K, H)."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor

    def returns(self) -> Tensor:
        """Each task's mean undiscounted episode return (T,)."""
        return self.rewards.sum(-1).mean(-1)


def rollout_seeds(seed: int, draw: int, episodes: int) -> tuple[int, list[int]]:
    """A task's randomness for its ``draw``-th set of rollouts (0: before adaptation, k: after k inner steps): one
    seed for the policy's noise and one per episode for the environment's initial state."""
    state = np.random.SeedSequence([seed, draw]).generate_state(episodes + 1, np.uint64)
    return int(state[0]) & (2**63 - 1), [int(s) & (2**31 - 1) for s in state[1:]]


@torch.no_grad()
def sample_rollouts(environment: Environment, parameters: Tensor, seeds: Tensor, draw: int, policy: BatchedPolicy,
                    episodes: int) -> Rollouts:
    """Run ``episodes`` episodes of each task (``parameters`` (T, P), ``seeds`` (T,)) with its own policy, as one
    vectorised environment of T·K copies. Each task's noise and initial states follow its seed and ``draw`` alone,
    so a task's rollouts do not depend on the meta-batch it is in."""
    tasks, horizon, device = len(parameters), environment.horizon, parameters.device
    noise, env_seeds = [], []
    for seed in seeds.tolist():
        noise_seed, starts = rollout_seeds(seed, draw, episodes)
        generator = torch.Generator().manual_seed(noise_seed)
        noise.append(torch.randn((episodes, horizon, environment.action_size), generator=generator))
        env_seeds += starts
    noise = torch.stack(noise).to(device)  # (T, K, H, A)
    envs = environment.vector(parameters.cpu().repeat_interleave(episodes, dim=0), env_seeds)  # T·K environments
    observation = envs.reset().to(device).view(tasks, episodes, -1)  # (T, K, O)
    observations, actions, rewards = [], [], []
    for step in range(horizon):
        mean, log_std = policy(observation)
        action = mean + log_std.exp() * noise[:, :, step]  # (T, K, A)
        next_observation, reward = envs.step(action.flatten(0, 1))
        observations.append(observation)
        actions.append(action)
        rewards.append(reward.to(device).view(tasks, episodes))
        observation = next_observation.to(device).view(tasks, episodes, -1)
    return Rollouts(torch.stack(observations, 2), torch.stack(actions, 2), torch.stack(rewards, 2))


def distribution(policy: BatchedPolicy, rollouts: Rollouts) -> tuple[Tensor, Tensor]:
    """The policy's (mean, log_std) at every step of the rollouts, each shaped like ``rollouts.actions``."""
    tasks, episodes, horizon, size = rollouts.observations.shape
    mean, log_std = policy(rollouts.observations.reshape(tasks, episodes * horizon, size))
    return mean.view(rollouts.actions.shape), log_std.view(rollouts.actions.shape)


def log_likelihood(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(actions; mean, exp(log_std)²) summed over the last dimension (the action's)."""
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> Tensor:
    """KL(old ‖ new) of diagonal Gaussians given as (mean, log_std), summed over the last dimension."""
    (mean_old, log_std_old), (mean_new, log_std_new) = old, new
    variance_old, variance_new = (2 * log_std_old).exp(), (2 * log_std_new).exp()
    return (log_std_new - log_std_old + (variance_old + (mean_old - mean_new).pow(2)) / (2 * variance_new)
            - 0.5).sum(-1)


def discounted_cumsum(values: Tensor, discount: float) -> Tensor:
    """Σ_{l ≥ 0} discountˡ · values[..., t + l] along the last dimension (H)."""
    horizon = values.shape[-1]
    steps = torch.arange(horizon, device=values.device)
    weights = (discount ** (steps.view(1, -1) - steps.view(-1, 1)).to(values.dtype)).triu()  # (H, H), [t, t+l]
    return values @ weights.T


def linear_baseline(rollouts: Rollouts, returns: Tensor, regularisation: float = 1e-5) -> Tensor:
    """rllab's ``LinearFeatureBaseline`` (Duan et al. 2016), fit per task by least squares on its K episodes:
    features [o, o², t, t², t³, 1] with o the observation clipped to [−10, 10] and t = step / 100; ridge
    ``regularisation`` (×10, up to 5 times, while the solution is not finite, as rllab). Returns the fitted values
    (T, K, H) for ``returns`` (T, K, H)."""
    tasks, episodes, horizon, _ = rollouts.observations.shape
    observations = rollouts.observations.double().clamp(-10, 10)
    time = (torch.arange(horizon, dtype=torch.float64, device=observations.device) / 100).view(1, 1, -1, 1)
    time = time.expand(tasks, episodes, horizon, 1)
    features = torch.cat([observations, observations.pow(2), time, time.pow(2), time.pow(3), torch.ones_like(time)],
                         -1).flatten(1, 2)  # (T, K·H, F)
    targets = returns.double().flatten(1).unsqueeze(-1)  # (T, K·H, 1)
    gram, moment = features.transpose(1, 2) @ features, features.transpose(1, 2) @ targets
    identity = torch.eye(features.shape[-1], dtype=torch.float64, device=features.device)
    for attempt in range(5):
        weights = torch.linalg.solve(gram + regularisation * 10**attempt * identity, moment)
        if torch.isfinite(weights).all():
            break
    return (features @ weights).view(tasks, episodes, horizon).to(returns.dtype)


def advantages(rollouts: Rollouts, discount: float, gae_lambda: float, normalise: bool = True) -> Tensor:
    """Generalised advantage estimates (T, K, H) with the linear baseline as the value function; an episode's
    value after its last step is 0 (fixed-length episodes end there). λ = 1: discounted return-to-go minus the
    baseline. ``normalise``: per task, minus the mean and over the standard deviation (rllab's ``center_adv``)."""
    returns = discounted_cumsum(rollouts.rewards, discount)
    values = linear_baseline(rollouts, returns)
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], -1)
    estimates = discounted_cumsum(rollouts.rewards + discount * next_values - values, discount * gae_lambda)
    if normalise:
        flat = estimates.flatten(1)
        mean, std = flat.mean(1), flat.std(1, correction=0)
        estimates = (estimates - mean.view(-1, 1, 1)) / (std.view(-1, 1, 1) + 1e-8)
    return estimates


def policy_gradient_loss(policy: BatchedPolicy, rollouts: Rollouts, advantage: Tensor) -> Tensor:
    """Each task's REINFORCE surrogate −mean_{k,t} log π(a|s) · A (T,), as rllab's VPG: its gradient is the
    task's vanilla policy gradient, negated."""
    return -(log_likelihood(rollouts.actions, *distribution(policy, rollouts)) * advantage).flatten(1).mean(1)
