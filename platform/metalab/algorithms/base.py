"""The one interface the MetaLearner calls: meta-parameters, the unadapted model, and ``adapt``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

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

    def write_meta_gradient(self, tasks: Episodes, loss_fn: LossFn) -> list[Tensor]:
        """Set ``.grad`` of the meta-parameters for one meta-batch; return each task's query predictions
        by its adapted learner (for logging the same metrics as every algorithm)."""
        raise NotImplementedError(f"{type(self).__name__} uses autograd for its meta-gradient")

    def fit_report(self) -> FitReport | None:
        """Anything learned besides the initialisation worth recording at the end (e.g. MetaSGD's rates)."""
        return None


class GradientBasedAlgorithm(MetaAlgorithm):
    """Shared settings of the MAML family: inner steps for training and for evaluation."""

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

    def _steps(self, learner: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
               training: bool) -> nn.Module:
        """Take the inner SGD steps on a learn2learn clone (``MAML``/``MetaSGD``), in place.

        Evaluation needs no graph back to the initialisation: first order gives the same adapted
        weights with far less memory.
        """
        for _ in range(self.inner_steps if training else self.eval_inner_steps):
            learner.adapt(loss_fn(learner(inputs), targets), first_order=None if training else True)
        return learner
