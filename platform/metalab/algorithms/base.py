"""The one interface the MetaLearner calls: meta-parameters, the unadapted model, and ``adapt``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metalab.algorithms.threaded import map_tasks, with_gradient
from metalab.algorithms.vectorised import vmapped_query_predictions
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Episodes

LossFn = Callable[[Tensor, Tensor], Tensor]
TaskLosses = Callable[[list[Tensor] | Tensor, Tensor], Tensor]  # (predictions, targets) → each task's loss, (T,)
BACKENDS = ("loop", "vmap", "threads", "auto")


@dataclass
class FitReport:
    """What an algorithm reports once meta-training ends: scalar metrics and matplotlib figures."""

    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # artifact file name -> matplotlib Figure


class MetaAlgorithm(nn.Module, ABC):
    """An algorithm owns the meta-parameters (its ``parameters()``, which the outer optimiser updates).

    ``adapt`` turns the support set of one task into a predictor for that task's queries. For most
    algorithms the meta-objective is the query loss of that predictor averaged over the meta-batch, and
    autograd gives its gradient. An algorithm whose outer update is no gradient of a loss (Reptile) sets
    ``autograd_meta_gradient = False`` and writes ``.grad`` itself in :meth:`write_meta_gradient`.
    """

    problems: tuple[str, ...] = ("regression", "classification")  # task kinds it can learn
    autograd_meta_gradient: bool = True
    one_output_per_way: bool = True  # the model's head has ``ways`` outputs (not so for metric-based ones)

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The shared initialisation, as a network: the predictor before any adaptation."""

    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn, training: bool) -> nn.Module:
        """Return a predictor adapted to one task's support set (x: (S, *x), y: (S, *y)).

        ``training`` selects the training settings (e.g. inner steps, higher-order graph) or the
        evaluation ones; in evaluation the result needs no graph back to the meta-parameters.
        """

    def query_predictions(self, tasks: Episodes, loss_fn: LossFn, training: bool) -> list[Tensor] | Tensor:
        """Each task's query predictions by its adapted predictor (one task after another); a vectorised
        backend may return them stacked, (T, Q, *out)."""
        return [self.adapt(tasks.support_x[index], tasks.support_y[index], loss_fn, training)(tasks.query_x[index])
                for index in range(len(tasks))]

    def meta_loss(self, tasks: Episodes, loss_fn: LossFn, task_losses: TaskLosses) -> tuple[list[Tensor] | Tensor,
                                                                                             Tensor]:
        """The meta-batch's query predictions and the meta-objective, the mean of ``task_losses`` over
        tasks, differentiable in the meta-parameters (what ``training_step`` returns to Lightning)."""
        return self._task_by_task_meta_loss(tasks, loss_fn, threaded=False)

    def _task_by_task_meta_loss(self, tasks: Episodes, loss_fn: LossFn, threaded: bool) -> tuple[Tensor, Tensor]:
        """The mean query loss (``loss_fn`` per task, as ``task_losses`` computes it), taking each task's
        meta-gradient as soon as the task is adapted, so only one task's graph (per worker thread) is alive
        at a time, as in the plain learn2learn loop (one ``backward()`` per task)."""
        parameters = [p for p in self.parameters() if p.requires_grad]

        def one_task(index: int) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
            learner = self.adapt(tasks.support_x[index], tasks.support_y[index], loss_fn, training=True)
            prediction = learner(tasks.query_x[index])
            loss = loss_fn(prediction, tasks.query_y[index])
            gradient = torch.autograd.grad(loss, parameters, allow_unused=True)  # frees this task's graph
            return prediction.detach(), loss.detach(), gradient

        predictions, losses, gradients = zip(*map_tasks(one_task, len(tasks), threaded), strict=True)
        mean_gradient = [torch.stack(used).sum(0) / len(tasks) if (used := [g for g in per_task if g is not None])
                         else None for per_task in zip(*gradients, strict=True)]
        return torch.stack(predictions), with_gradient(torch.stack(losses).mean(), parameters, mean_gradient)

    def write_meta_gradient(self, tasks: Episodes, loss_fn: LossFn) -> list[Tensor]:
        """Set ``.grad`` of the meta-parameters for one meta-batch; return each task's query predictions
        by its adapted learner (for logging the same metrics as every algorithm)."""
        raise NotImplementedError(f"{type(self).__name__} uses autograd for its meta-gradient")

    def fit_report(self) -> FitReport | None:
        """Anything learned besides the initialisation worth recording at the end (e.g. MetaSGD's rates)."""
        return None


class GradientBasedAlgorithm(MetaAlgorithm):
    """Shared settings of the MAML family: inner steps for training and for evaluation, and the
    inner-loop backend.

    ``backend``: ``loop`` adapts one task after another with learn2learn's ``clone()/adapt()``;
    ``vmap`` adapts the whole meta-batch at once with ``torch.func`` (:mod:`.vectorised`); ``threads``
    runs the loop's per-task work on CPU threads, one task per worker (:mod:`.threaded`); ``auto``
    times them on the first meta-batch (forward and backward, best of two after a warm-up; ``threads``
    only on a CPU with more than one thread) and keeps the fastest (``vmap`` only if it beats the loop by
    more than 5%), which the MLflow run records as the tag ``metalab.backend``.
    """

    def __init__(self, inner_lr: float, inner_steps: int, eval_inner_steps: int | None, backend: str) -> None:
        super().__init__()
        if inner_lr <= 0:
            raise ConfigError(f"algorithm.inner_lr must be > 0, got {inner_lr}")
        if inner_steps < 1:
            raise ConfigError(f"algorithm.inner_steps must be >= 1, got {inner_steps}")
        if eval_inner_steps is not None and eval_inner_steps < 1:
            raise ConfigError(f"algorithm.eval_inner_steps must be >= 1 or null, got {eval_inner_steps}")
        if backend not in BACKENDS:
            raise ConfigError(f"algorithm.backend must be {', '.join(BACKENDS[:-1])} or auto, got {backend!r}")
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.backend = backend
        self.chosen_backend: str | None = None if backend == "auto" else backend
        self.probe_seconds: dict[str, float] = {}

    def _steps(self, learner: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
               training: bool) -> nn.Module:
        """Take the inner SGD steps on a learn2learn clone (``MAML``/``MetaSGD``), in place.

        Evaluation needs no graph back to the initialisation: first order gives the same adapted
        weights with far less memory.
        """
        for _ in range(self.inner_steps if training else self.eval_inner_steps):
            learner.adapt(loss_fn(learner(inputs), targets), first_order=None if training else True)
        return learner

    @abstractmethod
    def vmap_spec(self) -> tuple[nn.Module, dict[str, Tensor | float], bool]:
        """For the vectorised backend: the network, ``{adapted parameter name: step size}``, first order."""

    def query_predictions(self, tasks: Episodes, loss_fn: LossFn, training: bool) -> list[Tensor] | Tensor:
        if self.chosen_backend == "vmap":
            return self._vmapped(tasks, loss_fn, training)

        def predict(index: int) -> Tensor:
            return self.adapt(tasks.support_x[index], tasks.support_y[index], loss_fn, training)(tasks.query_x[index])

        # threads only where no graph must survive the workers (evaluation); meta_loss threads training
        return map_tasks(predict, len(tasks), threaded=self.chosen_backend == "threads" and not training)

    def meta_loss(self, tasks: Episodes, loss_fn: LossFn, task_losses: TaskLosses) -> tuple[list[Tensor] | Tensor,
                                                                                             Tensor]:
        """``loop`` and ``threads`` go task by task (one task's graph alive at a time); ``vmap``
        differentiates the whole meta-batch at once."""
        if self.chosen_backend is None:
            self.chosen_backend = self._probe(tasks, loss_fn, task_losses)
        if self.chosen_backend == "vmap":
            predictions = self._vmapped(tasks, loss_fn, training=True)
            return predictions, task_losses(predictions, tasks.query_y).mean()
        return self._task_by_task_meta_loss(tasks, loss_fn, threaded=self.chosen_backend == "threads")

    def _vmapped(self, tasks: Episodes, loss_fn: LossFn, training: bool) -> Tensor:
        network, adapted, first_order = self.vmap_spec()
        return vmapped_query_predictions(network, adapted, tasks.support_x, tasks.support_y, tasks.query_x, loss_fn,
                                         self.inner_steps if training else self.eval_inner_steps,
                                         first_order or not training)

    def _probe(self, tasks: Episodes, loss_fn: LossFn, task_losses: TaskLosses) -> str:
        """Time one meta-gradient with each backend on this meta-batch; return the fastest."""
        parameters = [p for p in self.parameters() if p.requires_grad]
        candidates = ["loop", "vmap"]
        if tasks.support_x.device.type == "cpu" and torch.get_num_threads() > 1:
            candidates.append("threads")
        for backend in candidates * 3:  # the first round warms up
            self.chosen_backend = backend
            start = time.perf_counter()
            _, loss = self.meta_loss(tasks, loss_fn, task_losses)
            torch.autograd.grad(loss, parameters, allow_unused=True)  # leaves .grad untouched
            seconds = time.perf_counter() - start
            self.probe_seconds[backend] = min(seconds, self.probe_seconds.get(backend, seconds))
        # vmap (other numerics, more memory) must beat the reference loop by more than noise (5%); threads
        # runs the loop's own per-task computation, so being faster at all is enough
        needed = {"loop": 1.0, "threads": 1.0, "vmap": 0.95}
        qualified = [b for b in candidates if self.probe_seconds[b] <= needed[b] * self.probe_seconds["loop"]]
        return min(qualified, key=self.probe_seconds.__getitem__)
