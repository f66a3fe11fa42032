"""MAML for reinforcement learning: a vanilla-policy-gradient inner loop, a TRPO outer step.

Reference: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017,
§5.3 and its code (github.com/cbfinn/maml_rl, on rllab); TRPO: Schulman et al., ICML 2015. learn2learn has no
MAML-TRPO class (only an example script, ``examples/rl/maml_trpo.py``), so the inner step is written here, as
``torch.func`` over one copy of the policy's parameters per task (:mod:`metalab.algorithms.policy_gradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.base import Context, GradientBasedAlgorithm, Predictor
from metalab.algorithms.policy_gradient import (
    Parameters,
    Rollouts,
    advantages,
    batched_policy,
    distribution,
    gaussian_kl,
    log_likelihood,
    policy_gradient_loss,
    repeated,
    sample_rollouts,
)
from metalab.errors import ConfigError
from metalab.tasks.environments import EnvironmentTask, EnvironmentTasks

if TYPE_CHECKING:
    from torch.optim import Optimizer


class MAMLTRPO(GradientBasedAlgorithm):
    """Per task: ``inner_rollouts`` episodes with the current policy, then ``inner_steps`` steps of vanilla policy
    gradient (REINFORCE with rllab's linear feature baseline, GAE(``discount``, ``gae_lambda``), advantages
    normalised per task) of size ``inner_lr``; then as many episodes with the adapted policy. The outer step is
    TRPO on those post-adaptation episodes across the meta-batch: the surrogate mean_t E[π'_θ/π'_old · A] and the
    mean KL(π'_old ‖ π'_θ) over their states, both through the adaptation (second order unless ``first_order``);
    conjugate gradient (``cg_iterations``, damping ``cg_damping``) on the KL's Hessian-vector products gives the
    direction, scaled to KL = ``max_kl``; a backtracking line search (``backtrack_ratio``, ``max_backtracks``)
    keeps the first step whose KL ≤ ``max_kl`` and whose surrogate improves, else none (rllab's
    ``ConjugateGradientOptimizer``).

    Arguments:
        model: the policy (``forward(observations) -> (mean, log_std)``: model=gaussian_mlp).
        inner_lr, inner_steps, eval_inner_steps: the inner policy-gradient steps (the paper: 0.1, 1).
        inner_rollouts: episodes per task for each inner step and for the post-adaptation objective (the paper: 20).
        first_order: drop the second-order terms (the adapted parameters' Jacobian is taken as the identity).
        discount, gae_lambda: the advantages' γ and λ (the paper: 0.99; λ = 1: returns-to-go minus the baseline).
        normalise_advantages: per task, zero mean and unit standard deviation (rllab's ``center_adv``).
        max_kl: TRPO's trust region δ (the paper: 0.01).
        cg_iterations, cg_damping: conjugate gradient's iterations and the damping added to the Fisher product.
        backtrack_ratio, max_backtracks: the line search's step shrinking.

    Example (what :meth:`outer_step` does for a meta-batch ``tasks``)::

        pre = rollouts(tasks, θ); post = rollouts(tasks, θ − α∇L_pre(θ)); θ ← TRPO step on L_post(θ − α∇L_pre(θ))
    """

    problems = ("reinforcement",)
    owns_outer_step = True
    thread_safe = False  # functional_call swaps the policy's tensors while it runs

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, inner_rollouts: int = 20, first_order: bool = False,
                 discount: float = 0.99, gae_lambda: float = 1.0, normalise_advantages: bool = True,
                 max_kl: float = 0.01, cg_iterations: int = 10, cg_damping: float = 1e-5,
                 backtrack_ratio: float = 0.8, max_backtracks: int = 15) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        if inner_rollouts < 2:
            raise ConfigError(f"algorithm.inner_rollouts must be >= 2 (the baseline and advantages need episodes to "
                              f"compare), got {inner_rollouts}")
        for key, value in {"discount": discount, "gae_lambda": gae_lambda, "backtrack_ratio": backtrack_ratio}.items():
            if not 0 <= value <= 1:
                raise ConfigError(f"algorithm.{key} must be in [0, 1], got {value}")
        if max_kl <= 0 or cg_iterations < 1 or cg_damping < 0 or max_backtracks < 1:
            raise ConfigError(f"algorithm.max_kl must be > 0, cg_iterations and max_backtracks >= 1, cg_damping >= 0; "
                              f"got {max_kl}, {cg_iterations}, {max_backtracks}, {cg_damping}")
        self.policy = model
        self.inner_lr, self.inner_rollouts, self.first_order = inner_lr, inner_rollouts, first_order
        self.discount, self.gae_lambda, self.normalise_advantages = discount, gae_lambda, normalise_advantages
        self.max_kl, self.cg_iterations, self.cg_damping = max_kl, cg_iterations, cg_damping
        self.backtrack_ratio, self.max_backtracks = backtrack_ratio, max_backtracks

    @property
    def model(self) -> nn.Module:
        return self.policy

    # The inner loop --------------------------------------------------------------------------------------------

    def rollouts(self, tasks: EnvironmentTasks, parameters: Parameters, draw: int) -> Rollouts:
        """``inner_rollouts`` episodes of each task with its policy; ``draw``: which set (0 before adaptation, k
        after k inner steps), so evaluation sees the same episodes in every run."""
        detached = {name: value.detach() for name, value in parameters.items()}
        return sample_rollouts(tasks.environment, tasks.parameters, tasks.seeds, draw,
                               batched_policy(self.policy, detached), self.inner_rollouts)

    def inner_step(self, parameters: Parameters, rollouts: Rollouts, create_graph: bool) -> Parameters:
        """One vanilla policy-gradient step per task: θ'_t = θ_t − α ∇ L_t(θ_t), L_t the REINFORCE surrogate on
        task t's episodes (:func:`~metalab.algorithms.policy_gradient.policy_gradient_loss`)."""
        advantage = advantages(rollouts, self.discount, self.gae_lambda, self.normalise_advantages)
        loss = policy_gradient_loss(batched_policy(self.policy, parameters), rollouts, advantage).sum()
        names = list(parameters)  # the sum of tasks' losses: each task's gradient lands on its own copy
        gradients = torch.autograd.grad(loss, [parameters[name] for name in names], create_graph=create_graph)
        return {name: parameters[name] - self.inner_lr * gradient
                for name, gradient in zip(names, gradients, strict=True)}

    def adapted(self, pre: list[Rollouts], create_graph: bool) -> Parameters:
        """The meta-parameters adapted per task on the inner steps' episodes ``pre`` (one set per step)."""
        parameters = repeated(self.policy, len(pre[0].rewards))
        for rollouts in pre:
            parameters = self.inner_step(parameters, rollouts, create_graph)
        return parameters

    def adapt(self, task: EnvironmentTask, context: Context) -> Predictor:
        """The policy adapted to one task, as its mean action: observations (N, O) → (N, A)."""
        tasks = EnvironmentTasks.of([task])
        with torch.enable_grad():
            parameters = repeated(self.policy, 1)
            for step in range(self.steps(context)):
                parameters = self.inner_step(parameters, self.rollouts(tasks, parameters, step), create_graph=False)
        own = {name: value[0].detach() for name, value in parameters.items()}
        return lambda observations: functional_call(self.policy, own, (observations,))[0]

    # The outer step --------------------------------------------------------------------------------------------

    def outer_step(self, episodes: EnvironmentTasks, context: Context, optimizer: Optimizer) -> tuple[Tensor, Tensor]:
        """One MAML-TRPO meta-iteration; returns each task's mean post-adaptation return (T,) and the surrogate
        loss after the step (−E[ratio · A]; about −(the expected improvement))."""
        pre, parameters = [], repeated(self.policy, len(episodes))
        for step in range(self.steps(context)):  # sampling only: the graph is rebuilt in the TRPO step
            pre.append(self.rollouts(episodes, parameters, step))
            parameters = self.inner_step(parameters, pre[-1], create_graph=False)
        post = self.rollouts(episodes, parameters, len(pre))
        loss, _ = self.trpo_step(pre, post)
        # TRPO's step is the line search's, not an optimiser's: trpo_step wrote it into the parameters. One
        # optimiser step with every .grad None follows (torch's optimisers skip such parameters: no update, no
        # state), so Lightning counts the meta-iteration (global_step, checkpoints, schedulers, max_steps) and
        # optimizer= settings cannot bend the trust region.
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        return post.returns(), loss

    def surrogate_and_kl(self, pre: list[Rollouts], post: Rollouts, old: tuple[Tensor, Tensor], advantage: Tensor,
                         create_graph: bool) -> tuple[Tensor, Tensor]:
        """At the current meta-parameters: TRPO's loss −mean_t E[π'_θ(a|s)/π'_old(a|s) · A] over the
        post-adaptation episodes, and the mean KL(π'_old ‖ π'_θ) over their states, π'_θ the policy adapted on
        ``pre`` (differentiable in θ through the adaptation where ``create_graph``)."""
        new = distribution(batched_policy(self.policy, self.adapted(pre, create_graph and not self.first_order)),
                           post)
        ratio = (log_likelihood(post.actions, *new) - log_likelihood(post.actions, *old)).exp()
        return -(ratio * advantage).mean(), gaussian_kl(old, new).mean()

    def trpo_step(self, pre: list[Rollouts], post: Rollouts) -> tuple[Tensor, Tensor]:
        """Update the meta-parameters in place by TRPO on ``post`` (episodes of the policies adapted on ``pre``);
        return the loss and KL where it ends (the start's, loss −E[A] and KL 0, if the line search rejects all)."""
        theta = self.meta_parameters()
        start = torch.cat([p.detach().flatten() for p in theta])
        advantage = advantages(post, self.discount, self.gae_lambda, self.normalise_advantages)
        with torch.enable_grad():
            old = tuple(value.detach() for value in distribution(
                batched_policy(self.policy, self.adapted(pre, create_graph=False)), post))
            loss, kl = self.surrogate_and_kl(pre, post, old, advantage, create_graph=True)
            direction, curvature = self._search_direction(loss, kl, theta)
        loss = loss.detach()  # frees the second-order graph before the line search
        best = (loss, torch.zeros_like(loss))
        if not curvature > 0:  # no informative direction (e.g. every advantage zero): no step
            return best
        step = math.sqrt(2 * self.max_kl / curvature.item()) * direction  # ½ sᵀ F s = max_kl
        for shrink in range(self.max_backtracks):
            self._assign(start + self.backtrack_ratio ** shrink * step)
            with torch.enable_grad():  # the adaptation differentiates the inner loss
                new_loss, new_kl = (value.detach() for value in
                                    self.surrogate_and_kl(pre, post, old, advantage, create_graph=False))
            if new_kl <= self.max_kl and new_loss < loss:
                return new_loss, new_kl
        self._assign(start)
        return best

    def _search_direction(self, loss: Tensor, kl: Tensor, theta: list[nn.Parameter]) -> tuple[Tensor, Tensor]:
        """Conjugate gradient's solution x of (H + damping·I) x = −∇loss, H the KL's Hessian at θ by Hessian-vector
        products (the KL's gradient is 0 there: H is the Fisher information), and the curvature xᵀ(H + damping·I)x."""
        gradient = flat(torch.autograd.grad(loss, theta, retain_graph=True))
        kl_gradient = flat(torch.autograd.grad(kl, theta, create_graph=True))

        def fisher_product(vector: Tensor) -> Tensor:
            return flat(torch.autograd.grad(kl_gradient @ vector, theta, retain_graph=True)) + self.cg_damping * vector

        direction = conjugate_gradient(fisher_product, -gradient, self.cg_iterations)
        return direction.detach(), (direction @ fisher_product(direction)).detach()

    def _assign(self, vector: Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for parameter in self.meta_parameters():
                parameter.copy_(vector[offset:offset + parameter.numel()].view_as(parameter))
                offset += parameter.numel()

    # Evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, tasks: EnvironmentTasks, context: Context, curve_steps: int = 0) -> dict[str, Tensor]:
        """Each task's mean episode return (T,) before adaptation (``pre_return``), after ``eval_inner_steps``
        (``post_return``) and after 1…``curve_steps`` inner steps (``post_return_step<k>``): each step adapts on
        fresh episodes of the policy it starts from, as the paper's Figure 5 evaluates."""
        steps, last = self.steps(context), max(self.steps(context), curve_steps)
        returns = {}
        with torch.enable_grad():  # validation and test run under no_grad; the inner steps differentiate
            parameters = repeated(self.policy, len(tasks))
            for step in range(last + 1):
                rollouts = self.rollouts(tasks, parameters, step)
                mean_return = rollouts.returns()
                if step == 0:
                    returns["pre_return"] = mean_return
                if step == steps:
                    returns["post_return"] = mean_return
                if 1 <= step <= curve_steps:
                    returns[f"post_return_step{step}"] = mean_return
                if step < last:
                    parameters = {name: value.detach().requires_grad_() for name, value in
                                  self.inner_step(parameters, rollouts, create_graph=False).items()}
        return returns


def flat(tensors: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([tensor.flatten() for tensor in tensors])


def conjugate_gradient(product: Callable[[Tensor], Tensor], target: Tensor, iterations: int,
                       tolerance: float = 1e-10) -> Tensor:
    """x with A x ≈ ``target`` for the symmetric positive-definite A given by ``product`` (x ↦ A x)."""
    solution, residual = torch.zeros_like(target), target.clone()
    direction, squared = residual.clone(), residual @ residual
    for _ in range(iterations):
        image = product(direction)
        alpha = squared / (direction @ image)
        solution = solution + alpha * direction
        residual = residual - alpha * image
        new_squared = residual @ residual
        if new_squared < tolerance:
            break
        direction = residual + new_squared / squared * direction
        squared = new_squared
    return solution
