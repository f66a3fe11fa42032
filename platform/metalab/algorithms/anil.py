"""ANIL: adapt only the head; the feature extractor is shared by all tasks (learn2learn's ANIL recipe).

Reference: Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML", ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import learn2learn as l2l
from torch import Tensor, nn

from metalab.algorithms.base import Context, GradientBasedAlgorithm, Predictor, episode_zero_head
from metalab.algorithms.functional import checkpointed_sgd, vectorised_sgd
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task


class ANIL(GradientBasedAlgorithm):
    """``model.features`` is meta-learned but never adapted; a clone of ``model.head`` (wrapped in
    learn2learn's ``MAML``) takes ``inner_steps`` SGD steps on the support features.

    Needs a model with ``features`` and ``head`` (``mlp``, ``cnn4`` and ``resnet12`` have them). Arguments as
    :class:`~metalab.algorithms.MAML`; ``inner_checkpointing`` recomputes the head's inner steps (the features
    are computed once per task either way, so it saves only the head's activations). With ``zero_head`` each
    episode's head starts at zero, sized to its ways, and adapts from there: the features are all that is
    meta-learned (the model's own head is unused), and episodes of any number of ways work.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False,
                 inner_checkpointing: bool = False, zero_head: bool = False) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        self._checkpointing(inner_checkpointing, first_order)
        if not (isinstance(getattr(model, "features", None), nn.Module)
                and isinstance(getattr(model, "head", None), nn.Module)):
            raise ConfigError(f"algorithm=anil needs a model with `features` and `head` parts; "
                              f"{type(model).__name__} has not: use model=mlp, cnn4 or resnet12")
        self._zero_head(model, zero_head)
        self.network = model
        self.head = l2l.algorithms.MAML(model.head, lr=inner_lr, first_order=first_order)

    @property
    def model(self) -> nn.Module:
        return self.network

    def adapt(self, task: Task, context: Context) -> Predictor:
        if self.inner_checkpointing and context.training:
            rates = {name: self.head.lr for name, p in self.network.head.named_parameters() if p.requires_grad}
            head = checkpointed_sgd(self.network.head, rates, self.network.features(task.support_x), task.support_y,
                                    context.loss_fn, self.steps(context))
            return lambda x: head(self.network.features(x))
        head = self.head.clone()
        if self.zero_head:
            head.module._parameters.update(episode_zero_head(head.module, task.support_y))
        head = self._steps(head, self.network.features(task.support_x), task.support_y, context)
        return nn.Sequential(self.network.features, head)

    def vectorised_adapt(self, support_x: Tensor, support_y: Tensor, context: Context,
                         support_mask: Tensor | None = None) -> Callable[..., Tensor]:
        rates = {name: self.head.lr for name, _ in self.network.named_parameters() if name.startswith("head.")}
        start, classes = self._vectorised_zero_head(self.network.head, support_y)
        return vectorised_sgd(self.network, rates, support_x, support_y, context.loss_fn, self.steps(context),
                              self.head.first_order or not context.training, support_mask, start, classes)
