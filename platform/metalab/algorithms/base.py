"""What an algorithm is: the maths of adapting to one task, and of that task's meta-gradient.

How the tasks of a meta-batch are executed (one after another, on threads, vectorised) is the
:class:`~metalab.runner.TaskRunner`'s business, not the algorithm's. An algorithm has two verbs, in
learn2learn's spirit:

- ``adapt(task, context) -> predictor``: turn one task's support set into a predictor of its queries;
- ``task_meta_gradient(task, context)``: that task's contribution to the outer update. The default
  differentiates :meth:`~MetaAlgorithm.query_loss` (the adapted predictor's query loss) by autograd;
  an algorithm whose meta-gradient is something else (iMAML's implicit one, Reptile's θ − φ) overrides it.

Opt-in, for the ``vmap`` backend: ``vectorised_adapt(support_x, support_y, context)`` adapts a whole
stacked meta-batch at once and returns a predictor of its stacked queries (T, Q, *x) → (T, Q, *out). An
algorithm without it never runs under ``vmap``. One that also takes ``support_mask`` (T, S) and returns a
predictor taking ``query_mask`` (T, Q) vectorises ragged meta-batches, padded (:mod:`metalab.runner.padding`;
:func:`~metalab.algorithms.functional.vectorised_sgd` does the masking). An algorithm that owns its whole
outer step (e.g. TRPO for meta-RL) sets ``owns_outer_step = True`` and implements
:meth:`~MetaAlgorithm.outer_step`. Evaluation's ``pre_*`` metrics come from :meth:`~MetaAlgorithm.unadapted`
(default: ``model``; ``None``: none logged). An algorithm whose tasks depend on one another (state carried from
task to task) sets ``sequential_tasks``: the runner then executes its tasks with the loop only.

Batch norm: adaptation and evaluation never write running statistics (the learner switches their tracking
off around them, so every backend leaves the same checkpoint); once per meta-iteration the learner calls
:meth:`~MetaAlgorithm.update_running_statistics` on the meta-batch's first task instead. ``eval_batch_norm``
says how evaluation normalises: ``transductive`` (each task's batch statistics, as MAML) or ``running`` (the
running statistics, as ``model.eval()``; Prototypical Networks' code).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from metalab.errors import ConfigError

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from metalab.tasks.episodes import Episodes, Task

LossFn = Callable[[Tensor, Tensor], Tensor]
Predictor = Callable[[Any], Tensor]  # query inputs → predictions
BatchNormMode = Literal["transductive", "running"]
BATCH_NORM_MODES = ("transductive", "running")


@dataclass(frozen=True)
class Context:
    """What an algorithm is told about the moment it adapts in.

    ``training``: meta-training settings (inner steps, higher-order graph) or evaluation ones (no graph
    back to the meta-parameters is needed). ``step``: the meta-iteration (Lightning's global step), for
    annealing schedules. ``inner_steps``: evaluate after this many inner steps instead of the algorithm's
    own (the inner-step curve of ``test_curve_steps``).
    """

    loss_fn: LossFn
    training: bool
    step: int = 0
    inner_steps: int | None = None

    def evaluating(self) -> Context:
        return replace(self, training=False)


@dataclass
class TaskGradient:
    """One task's outcome: its query predictions and loss (no graph) and its meta-gradient, one entry per
    meta-parameter (``None`` where the task does not reach it)."""

    prediction: Tensor
    loss: Tensor
    gradient: tuple[Tensor | None, ...]


@dataclass
class FitReport:
    """What an algorithm reports once meta-training ends: scalar metrics and matplotlib figures."""

    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # artifact file name -> matplotlib Figure


class MetaAlgorithm(nn.Module, ABC):
    """An algorithm owns the meta-parameters (its trainable ``parameters()``, which the outer optimiser
    updates) and says how one task adapts. See the module docstring for the interface."""

    problems: tuple[str, ...] = ("regression", "classification")  # task kinds it can learn
    one_output_per_way: bool = True  # the model's head has ``ways`` outputs (not so for metric-based ones)
    owns_outer_step: bool = False  # True: :meth:`outer_step` replaces the runner and the outer optimiser step
    sequential_tasks: bool = False  # True: a task starts from state the previous one left (loop backend only)
    thread_safe: bool = True  # False: adapting one task mutates shared state (e.g. torch.func.functional_call swaps
                              # the model's parameters while it runs), so tasks must not run on threads at once
    eval_batch_norm: BatchNormMode = "transductive"  # how evaluation normalises (module docstring)
    episodic: bool = True  # False: meta-training is pre-training on labelled examples (``pretraining_loss``, finetune)

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The shared initialisation, as a network: the predictor before any adaptation."""

    @abstractmethod
    def adapt(self, task: Task, context: Context) -> Predictor:
        """A predictor adapted to ``task``'s support set (in training, differentiable in the meta-parameters)."""

    def unadapted(self, task: Task, context: Context) -> Predictor | None:
        """What predicts ``task``'s queries before adaptation, for the ``pre_*`` metrics: the shared
        initialisation by default. ``None`` where "before adaptation" means nothing the algorithm uses
        (ProtoNet: its only predictor is built from the support set), and no ``pre_*`` metric is logged."""
        return self.model

    def update_running_statistics(self, task: Task, context: Context) -> None:
        """One forward, in training mode, that moves the batch-norm running statistics (by each layer's
        momentum) towards this training task's: the unadapted model on the support and query inputs in one
        batch. The learner calls it under ``no_grad`` with the meta-batch's first task, once per
        meta-iteration, before the outer step; an algorithm whose predictor normalises other inputs (e.g. a
        sub-network) overrides it."""
        self.model(joined_inputs(task))

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the outer optimiser updates, in the order of every ``TaskGradient.gradient``."""
        return [p for p in self.parameters() if p.requires_grad]

    def query_loss(self, task: Task, context: Context) -> tuple[Tensor, Tensor]:
        """The adapted predictor's query predictions and the task's meta-objective (its query loss)."""
        prediction = self.adapt(task, context)(task.query_x)
        return prediction, context.loss_fn(prediction, task.query_y)

    def task_meta_gradient(self, task: Task, context: Context) -> TaskGradient:
        """Autograd's gradient of :meth:`query_loss`, taken at once so the task's graph is freed."""
        prediction, loss = self.query_loss(task, context)
        gradient = torch.autograd.grad(loss, self.meta_parameters(), allow_unused=True)
        return TaskGradient(prediction.detach(), loss.detach(), gradient)

    def outer_step(self, episodes: Episodes, context: Context, optimizer: Optimizer) -> tuple[Tensor, Tensor]:
        """With ``owns_outer_step``: update the meta-parameters for one meta-batch, through at least one
        ``optimizer.step()`` (Lightning counts meta-iterations by optimiser steps; write ``.grad`` with the
        update direction, e.g. after a line search); return the query predictions and the mean query loss (for
        ``reinforcement`` tasks: each task's post-adaptation return (T,) and the outer objective's loss).

        A reinforcement-learning algorithm also implements ``evaluate(tasks, context, curve_steps) -> {name: (T,)}``
        (each task's ``pre_return``, ``post_return``, ``post_return_step<k>``), which the learner records."""
        raise NotImplementedError(f"{type(self).__name__} leaves its outer step to the runner and the optimiser")

    def fit_report(self) -> FitReport | None:
        """Anything learned besides the initialisation worth recording at the end (e.g. MetaSGD's rates)."""
        return None


class GradientBasedAlgorithm(MetaAlgorithm):
    """Shared settings of the MAML family: inner steps for training and for evaluation.

    ``inner_checkpointing`` (set by :meth:`_checkpointing`, only by algorithms whose meta-gradient goes through
    the inner loop): meta-training runs each inner step under ``torch.utils.checkpoint`` (e.g.
    :func:`~metalab.algorithms.functional.checkpointed_sgd`), so that the outer backward recomputes its
    activations and memory grows with one step's, not with ``inner_steps``.
    """

    inner_checkpointing: bool = False
    zero_head: bool = False  # each episode's head starts at zero, sized to its ways (set by :meth:`_zero_head`)

    def __init__(self, inner_lr: float, inner_steps: int, eval_inner_steps: int | None) -> None:
        super().__init__()
        if inner_lr <= 0:
            raise ConfigError(f"algorithm.inner_lr must be > 0, got {inner_lr}")
        if inner_steps < 1:
            raise ConfigError(f"algorithm.inner_steps must be >= 1, got {inner_steps}")
        if eval_inner_steps is not None and eval_inner_steps < 1:
            raise ConfigError(f"algorithm.eval_inner_steps must be >= 1 or null, got {eval_inner_steps}")
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps

    def steps(self, context: Context) -> int:
        """How many inner steps to take now."""
        if context.inner_steps is not None:
            return context.inner_steps
        return self.inner_steps if context.training else self.eval_inner_steps

    def _checkpointing(self, inner_checkpointing: bool, first_order: bool) -> None:
        """Set ``inner_checkpointing``, refusing it where there is no second-order graph to save memory on."""
        if inner_checkpointing and first_order:
            raise ConfigError("algorithm.inner_checkpointing=true needs second-order meta-gradients, and "
                              "algorithm.first_order=true keeps no inner-loop graph to checkpoint: set either false")
        self.inner_checkpointing = inner_checkpointing

    def _zero_head(self, model: nn.Module, zero_head: bool, checkpointing_allowed: bool = False) -> None:
        """Set ``zero_head`` (Triantafillou et al. 2020's fo-MAML on Meta-Dataset): every episode's linear head
        starts at zero with one row per way of the episode (:func:`episode_zero_head`), so the head is not
        meta-learned, the features are, and episodes of any number of ways work. The head then has no fixed
        number of outputs (``one_output_per_way`` false); a vectorised inner loop starts from
        :meth:`_vectorised_zero_head`'s. Call after :meth:`_checkpointing`; ``checkpointing_allowed``: the
        algorithm's checkpointed inner loop takes the zero head too."""
        if zero_head and not isinstance(getattr(model, "head", None), nn.Linear):
            raise ConfigError(f"algorithm.zero_head=true needs a model whose head is one linear layer (model.head), "
                              f"and {type(model).__name__} has none: use model=cnn4 or resnet12")
        if zero_head and self.inner_checkpointing and not checkpointing_allowed:
            raise ConfigError("algorithm.zero_head=true and algorithm.inner_checkpointing=true cannot be combined: "
                              "set either false")
        self.zero_head = zero_head
        self.one_output_per_way = not zero_head  # a zero head takes each episode's ways

    def _vectorised_zero_head(self, head: nn.Linear, support_y: Tensor) -> tuple[dict[str, Tensor] | None,
                                                                                  Tensor | None]:
        """With ``zero_head``, for :func:`~metalab.algorithms.functional.vectorised_sgd` over a meta-batch whose
        support labels are ``support_y`` (T, S) (padded ones repeat real ones): its ``start``, one zero head of
        the meta-batch's largest ways W for every task (``head.weight``, ``head.bias``), and its ``classes``, the
        (T, W) classes each task has (``None`` when every task has all W). ``(None, None)`` without."""
        if not self.zero_head:
            return None, None
        start = {f"head.{kind}": zeros for kind, zeros in episode_zero_head(head, support_y).items()}
        ways, largest = support_y.flatten(1).amax(1) + 1, len(start["head.weight"])  # (T,), W
        if bool((ways == largest).all()):
            return start, None
        return start, torch.arange(largest, device=support_y.device) < ways.unsqueeze(1)

    def unadapted(self, task: Task, context: Context) -> Predictor | None:
        """With ``zero_head`` nothing predicts before adaptation (the head is zero): no ``pre_*`` metrics."""
        return None if self.zero_head else super().unadapted(task, context)

    def _steps(self, learner: nn.Module, inputs: Any, targets: Tensor, context: Context) -> nn.Module:
        """Take the inner SGD steps on a learn2learn clone (``MAML``/``MetaSGD``), in place.

        Evaluation needs no graph back to the initialisation: first order gives the same adapted
        weights with far less memory.
        """
        for _ in range(self.steps(context)):
            learner.adapt(context.loss_fn(learner(inputs), targets), first_order=None if context.training else True)
        return learner


def joined_inputs(task: Task) -> Any:
    """The task's support and query inputs as one batch (tensors, or dicts of tensors with the same keys)."""
    return concatenated(task.support_x, task.query_x)


def concatenated(first: Any, second: Any) -> Any:
    """Two batches of inputs as one: tensors along dim 0, or dicts of tensors (token ids, masks) key by key."""
    if isinstance(first, dict):
        return {key: torch.cat([value, second[key]]) for key, value in first.items()}
    return torch.cat([first, second])


def episode_zero_head(head: nn.Linear, labels: Tensor) -> dict[str, Tensor]:
    """The zero head of an episode whose labels are ``labels`` (0 … N−1): ``weight`` (N, D) and ``bias`` (N,)
    of zeros, in ``head``'s dtype and device, each a leaf of its own (so no meta-gradient reaches ``head``).

    After one inner SGD step of size α on the mean cross-entropy of S support examples with features φ_i, the
    head is W_k = α/S · Σ_i (1[y_i = k] − 1/N) φ_i, b_k = α/S · Σ_i (1[y_i = k] − 1/N): at zero every logit is
    equal, so the step moves each row towards its class's features (a scaled prototype) and the features get no
    gradient (∂L/∂φ = Wᵀ(p − y) = 0); they adapt from the second step on."""
    ways, like = int(labels.max()) + 1, head.weight
    zeros = {"weight": like.new_zeros(ways, like.shape[1]).requires_grad_()}
    if head.bias is not None:
        zeros["bias"] = like.new_zeros(ways).requires_grad_()
    return zeros
