"""iMAML: implicit MAML, the meta-gradient of a proximal inner problem by the implicit function theorem.

Reference: Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019
(Algorithm 1, with Algorithm 2's meta-gradient by conjugate gradient; the variant with a gradient-descent inner
solver, "iMAML, GD" of Table 2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from metalab.algorithms.base import Context, GradientBasedAlgorithm, LossFn, TaskGradient
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task

Vectors = list[Tensor]  # one tensor per adapted parameter, in the order of meta_parameters()


class IMAML(GradientBasedAlgorithm):
    """Per task, φ* ≈ argmin_φ L_support(φ) + (λ/2)‖φ − θ‖² by ``inner_steps`` steps of gradient descent that
    keep no graph; the task's meta-gradient is v solving ((1 + δ)·I + H/λ) v = ∇_φ L_query(φ*), with H the
    Hessian of L_support at φ*, by ``cg_steps`` steps of conjugate gradient on Hessian-vector products. Memory
    does not grow with ``inner_steps``: only one support loss's graph (for the Hessian-vector products) is kept.

    With δ = 0 and exact solves, v = dφ*/dθᵀ ∇L_query(φ*), the exact meta-gradient, since
    dφ*/dθ = (I + H/λ)⁻¹ (paper, Lemma 1). A network's support loss is not convex, so I + H/λ need not be
    positive definite and CG can amplify a direction of near-zero curvature; the authors' code damps the system
    with δ = 1 (and adds 10 to λ in H/λ), the default here (on kanji 5-way 1-shot, 100 meta-steps, δ = 1 reached
    0.79 accuracy, δ = 0 0.66–0.71).

    The implicit meta-gradient assumes the inner problem solved; it does not see the inner loop. Meta-training
    tends to sharpen the support loss (a larger curvature h fits the support better at a given λ), and once
    h > 2/inner_lr − λ gradient descent diverges: on regression, where the loss scale is free, keep inner_lr
    small and inner_lr·λ·inner_steps ≳ 1 (the inner problem then converges where the meta-gradient needs it).

    Arguments:
        model: the network whose initialisation θ is meta-learned (batch norm in train mode normalises
            each forward with its batch's statistics).
        inner_lr: step size α of the inner gradient descent φ ← φ − α(∇L_support(φ) + λ(φ − θ)).
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at validation/test; ``None`` = ``inner_steps``.
        reg_lambda: λ, the strength of the proximal term that keeps φ near θ.
        cg_steps: conjugate-gradient steps for the meta-gradient (each one Hessian-vector product).
        cg_damping: δ ≥ 0 added to the identity of the CG system (0: the paper's equation; 1: the authors' code).

    Example (what the runner does per task)::

        outcome = imaml.task_meta_gradient(task, Context(F.cross_entropy, training=True))
        # outcome.gradient: one tensor per imaml.meta_parameters(); the runner averages them over tasks
        learner = imaml.adapt(task, Context(F.cross_entropy, training=False)); learner(task.query_x)
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 16,
                 eval_inner_steps: int | None = None, reg_lambda: float = 2.0, cg_steps: int = 5,
                 cg_damping: float = 1.0) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        if reg_lambda <= 0:
            raise ConfigError(f"algorithm.reg_lambda must be > 0 (the proximal term's λ), got {reg_lambda}")
        if cg_steps < 1:
            raise ConfigError(f"algorithm.cg_steps must be >= 1, got {cg_steps}")
        if cg_damping < 0:
            raise ConfigError(f"algorithm.cg_damping must be >= 0, got {cg_damping}")
        self.network = model
        self.inner_lr, self.reg_lambda = inner_lr, reg_lambda
        self.cg_steps, self.cg_damping = cg_steps, cg_damping

    @property
    def model(self) -> nn.Module:
        return self.network

    def adapt(self, task: Task, context: Context) -> nn.Module:
        """A copy of the network holding the task's φ* (no graph back to θ: the meta-gradient is implicit)."""
        return self.solve(task.support_x, task.support_y, context.loss_fn, self.steps(context))

    def task_meta_gradient(self, task: Task, context: Context) -> TaskGradient:
        """v = ((1 + δ)·I + H/λ)⁻¹ ∇_φ L_query(φ*), by CG; H v by double backward through L_support at φ*."""
        learner = self.adapt(task, context)
        adapted = _trainable(learner)
        with torch.enable_grad():
            prediction = learner(task.query_x)
            loss = context.loss_fn(prediction, task.query_y)
            query_gradient = list(torch.autograd.grad(loss, adapted, allow_unused=True, materialize_grads=True))
            support_loss = context.loss_fn(learner(task.support_x), task.support_y)
            support_gradient = torch.autograd.grad(support_loss, adapted, create_graph=True, allow_unused=True,
                                                   materialize_grads=True)
        connected = [index for index, g in enumerate(support_gradient) if g.requires_grad]  # H = 0 elsewhere

        def system_times(vector: Vectors) -> Vectors:  # ((1 + δ)·I + H/λ) v
            damped = [v * (1.0 + self.cg_damping) for v in vector]
            if not connected:
                return damped
            products = torch.autograd.grad([support_gradient[i] for i in connected], adapted,
                                           grad_outputs=[vector[i] for i in connected], retain_graph=True,
                                           allow_unused=True, materialize_grads=True)
            return [d + hv / self.reg_lambda for d, hv in zip(damped, products, strict=True)]

        direction = conjugate_gradient(system_times, query_gradient, self.cg_steps)
        return TaskGradient(prediction.detach(), loss.detach(), tuple(direction))

    def solve(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn, steps: int) -> nn.Module:
        """A copy of the network moved to φ* ≈ argmin_φ L_support(φ) + (λ/2)‖φ − θ‖² by ``steps`` steps of gradient
        descent from θ, in place. Each step's graph is freed before the next: memory is one step's, whatever
        ``steps``. (A copy per task, not ``functional_call`` on the shared network, which swaps the network's
        parameters while it runs, so tasks on the threads backend cannot share it.)"""
        learner = copy.deepcopy(self.network)
        adapted = _trainable(learner)
        start = [p.detach().clone() for p in adapted]  # θ
        for _ in range(steps):
            with torch.enable_grad():
                loss = loss_fn(learner(support_x), support_y)
                gradients = torch.autograd.grad(loss, adapted, allow_unused=True, materialize_grads=True)
            with torch.no_grad():
                for phi, gradient, theta in zip(adapted, gradients, start, strict=True):
                    phi.sub_(self.inner_lr * (gradient + self.reg_lambda * (phi - theta)))
        return learner


def _trainable(network: nn.Module) -> list[nn.Parameter]:
    """The parameters the inner loop adapts: in the order of ``meta_parameters()`` (the network is the only child)."""
    return [p for p in network.parameters() if p.requires_grad]


def conjugate_gradient(matrix_times: Callable[[Vectors], Vectors], b: Vectors, steps: int) -> Vectors:
    """``steps`` iterations of CG on A x = b from x = 0, A given by its products (Hestenes & Stiefel 1952).

    A is symmetric but, where the support loss is not convex (H has eigenvalues below −λ(1 + δ)), not positive
    definite: as truncated CG in Hessian-free optimisation (Steihaug 1983; Martens 2010), x stops at the first
    direction of non-positive curvature instead of stepping along it, which would blow x up. The same guard
    stops x once the residual is exactly zero. No host-device synchronisation per step."""
    x = [torch.zeros_like(t) for t in b]
    residual = [t.clone() for t in b]
    direction = [t.clone() for t in b]
    squared = _dot(residual, residual)
    active = squared > 0
    for _ in range(steps):
        product = matrix_times(direction)
        curvature = _dot(direction, product)
        active = active & (curvature > 0)
        alpha = torch.where(active, squared / curvature, torch.zeros_like(squared))
        x = [xi + alpha * di for xi, di in zip(x, direction, strict=True)]
        residual = [ri - alpha * pi for ri, pi in zip(residual, product, strict=True)]
        new_squared = _dot(residual, residual)
        active = active & (new_squared > 0)
        beta = torch.where(active, new_squared / squared, torch.zeros_like(squared))
        direction = [ri + beta * di for ri, di in zip(residual, direction, strict=True)]
        squared = new_squared
    return x


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((ai * bi).sum() for ai, bi in zip(a, b, strict=True))
