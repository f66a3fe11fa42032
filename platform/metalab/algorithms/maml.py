"""MAML and first-order MAML, as a thin adapter over learn2learn's ``MAML.clone()/adapt()``.

Reference: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017. First order: the same paper, §5.2 ("first-order approximation").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import learn2learn as l2l
from torch import Tensor, nn

from metalab.algorithms.base import Context, GradientBasedAlgorithm, Predictor, episode_zero_head
from metalab.algorithms.functional import checkpointed_sgd, vectorised_sgd

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task


class MAML(GradientBasedAlgorithm):
    """Adapt a clone of the model by ``inner_steps`` SGD steps on the support loss.

    Arguments:
        model: the network whose initialisation is meta-learned.
        inner_lr: step size of the inner SGD.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at validation/test (papers often use more); ``None`` = ``inner_steps``.
        first_order: drop second-order terms of the meta-gradient (FOMAML).
        allow_unused: tolerate parameters that the support loss does not use.
        allow_nograd: tolerate parameters with ``requires_grad=False`` (they are not adapted).
        inner_checkpointing: in meta-training, recompute each inner step's activations in the outer backward
            (memory of one step, not ``inner_steps``; second order only; not under ``runner.backend=vmap``).
        zero_head: start every episode's linear head (``model.head``) at zero, shaped for the episode's ways,
            as Triantafillou et al. 2020 (Meta-Dataset) do for (fo-)MAML: the head is not meta-learned, the
            features are, and episodes of any number of ways work (``task.sampler=meta_dataset``). No
            ``pre_*`` metrics (before adaptation the head is zero); any ``runner.backend``.

    Example (what the runner does per task)::

        learner = maml.clone(); learner.adapt(loss(learner(xs), ys)); grad(loss(learner(xq), yq), maml.parameters())
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False,
                 allow_unused: bool = False, allow_nograd: bool = False, inner_checkpointing: bool = False,
                 zero_head: bool = False) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        self._checkpointing(inner_checkpointing, first_order)
        self._zero_head(model, zero_head)
        self.maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order,
                                        allow_unused=allow_unused, allow_nograd=allow_nograd)

    @property
    def model(self) -> nn.Module:
        return self.maml.module

    def adapt(self, task: Task, context: Context) -> Predictor:
        if self.zero_head:
            learner = self.maml.clone()
            learner.module.head._parameters.update(episode_zero_head(learner.module.head, task.support_y))
            return self._steps(learner, task.support_x, task.support_y, context)
        if self.inner_checkpointing and context.training:
            return checkpointed_sgd(self.maml.module, self._rates(), task.support_x, task.support_y, context.loss_fn,
                                    self.steps(context), allow_unused=self.maml.allow_unused)
        return self._steps(self.maml.clone(), task.support_x, task.support_y, context)

    def vectorised_adapt(self, support_x: Tensor, support_y: Tensor, context: Context,
                         support_mask: Tensor | None = None) -> Callable[..., Tensor]:
        start, classes = self._vectorised_zero_head(self.maml.module.head, support_y)
        return vectorised_sgd(self.maml.module, self._rates(), support_x, support_y, context.loss_fn,
                              self.steps(context), self.maml.first_order or not context.training, support_mask,
                              start, classes)

    def _rates(self) -> dict[str, float]:
        """The inner step size of each adapted parameter (learn2learn leaves ``requires_grad=False`` ones alone)."""
        return {name: self.maml.lr for name, p in self.maml.module.named_parameters() if p.requires_grad}
