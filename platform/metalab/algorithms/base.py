"""The one interface the MetaLearner calls: meta-parameters, the unadapted model, and ``adapt``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metalab.algorithms.vectorised import vmapped_query_predictions
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Episodes

LossFn = Callable[[Tensor, Tensor], Tensor]


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
    ``vmap`` adapts the whole meta-batch at once with ``torch.func`` (:mod:`.vectorised`); ``auto``
    times both on the first meta-batch (forward and backward, best of two after a warm-up) and keeps the
    faster, which the MLflow run records as the tag ``metalab.backend``.
    """

    def __init__(self, inner_lr: float, inner_steps: int, eval_inner_steps: int | None, backend: str) -> None:
        super().__init__()
        if inner_lr <= 0:
            raise ConfigError(f"algorithm.inner_lr must be > 0, got {inner_lr}")
        if inner_steps < 1:
            raise ConfigError(f"algorithm.inner_steps must be >= 1, got {inner_steps}")
        if eval_inner_steps is not None and eval_inner_steps < 1:
            raise ConfigError(f"algorithm.eval_inner_steps must be >= 1 or null, got {eval_inner_steps}")
        if backend not in ("loop", "vmap", "auto"):
            raise ConfigError(f"algorithm.backend must be loop, vmap or auto, got {backend!r}")
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
        if self.chosen_backend is None:
            self.chosen_backend = self._probe(tasks, loss_fn)
        if self.chosen_backend == "vmap":
            return self._vmapped(tasks, loss_fn, training)
        return super().query_predictions(tasks, loss_fn, training)

    def _vmapped(self, tasks: Episodes, loss_fn: LossFn, training: bool) -> Tensor:
        network, adapted, first_order = self.vmap_spec()
        return vmapped_query_predictions(network, adapted, tasks.support_x, tasks.support_y, tasks.query_x, loss_fn,
                                         self.inner_steps if training else self.eval_inner_steps,
                                         first_order or not training)

    def _probe(self, tasks: Episodes, loss_fn: LossFn) -> str:
        """Time one meta-gradient with each backend on this meta-batch; return the faster."""
        parameters = [p for p in self.parameters() if p.requires_grad]
        for backend in ("loop", "vmap", "loop", "vmap", "loop", "vmap"):  # the first round warms up
            self.chosen_backend = backend
            start = time.perf_counter()
            predictions = self.query_predictions(tasks, loss_fn, training=True)
            loss = sum(loss_fn(p, y) for p, y in zip(predictions, tasks.query_y, strict=True)) / len(tasks)
            torch.autograd.grad(loss, parameters, allow_unused=True)  # leaves .grad untouched
            seconds = time.perf_counter() - start
            self.probe_seconds[backend] = min(seconds, self.probe_seconds.get(backend, seconds))
        # vmap must win by more than noise (5%) to replace the reference loop
        return "vmap" if self.probe_seconds["vmap"] < 0.95 * self.probe_seconds["loop"] else "loop"
