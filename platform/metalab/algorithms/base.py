"""The one interface the MetaLearner calls: meta-parameters, the unadapted model, and ``adapt``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


class MetaAlgorithm(nn.Module, ABC):
    """An algorithm owns the meta-parameters (its ``parameters()``, which the outer optimiser updates).

    ``adapt`` turns the support set of one task into a predictor for that task's queries; the query
    loss of that predictor, averaged over the meta-batch, is the meta-objective.
    """

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
