"""Meta-SGD: MAML with a learned inner learning rate per parameter, via learn2learn's ``MetaSGD``.

Reference: Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import learn2learn as l2l
import torch
from torch import Tensor, nn

from metalab.algorithms.base import Context, FitReport, GradientBasedAlgorithm, Predictor, episode_zero_head
from metalab.algorithms.functional import checkpointed_sgd, vectorised_sgd

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task


class MetaSGD(GradientBasedAlgorithm):
    """Adapt a clone by ``inner_steps`` steps of θ ← θ − α ⊙ ∇L, with α (same shape as θ) meta-learned.

    Arguments: ``inner_lr`` initialises every α; the rest (``inner_checkpointing`` and ``zero_head`` too) as
    :class:`~metalab.algorithms.MAML`.

    With ``zero_head`` each episode's head starts at zero, sized to its ways, and the head's rates are shared by
    the ways: one rate per feature for the weight, (1, D), and one for the bias, (1,), broadcast over the
    episode's N rows. A rate per row could not follow the ways from episode to episode, and would mean nothing
    if it could: an episode's labels are a random order of its classes, so row k is no particular class. The
    features keep a rate per parameter and stay meta-learned; the model's own head is unused.
    At the end of meta-training the learned rates are summarised (``metasgd/lr_mean``, ``_std``,
    ``_min``, ``_max``, ``_negative_fraction``) and their histogram is saved as ``metasgd_lrs.png``.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False,
                 inner_checkpointing: bool = False, zero_head: bool = False) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        self._checkpointing(inner_checkpointing, first_order)
        self._zero_head(model, zero_head)
        lrs = None  # learn2learn's: α shaped as θ
        if zero_head:  # the head's α shared along its ways dimension (dim 0): weight (1, D), bias (1,)
            head = {id(p) for p in model.head.parameters()}
            lrs = nn.ParameterList([nn.Parameter(torch.full((1, *p.shape[1:]) if id(p) in head else p.shape,
                                                            inner_lr, dtype=p.dtype, device=p.device))
                                    for p in model.parameters()])
        self.metasgd = l2l.algorithms.MetaSGD(model, lr=inner_lr, first_order=first_order, lrs=lrs)

    @property
    def model(self) -> nn.Module:
        return self.metasgd.module

    def adapt(self, task: Task, context: Context) -> Predictor:
        if self.zero_head:
            learner = self.metasgd.clone()  # its head's parameters swapped for zeros; their rates broadcast
            learner.module.head._parameters.update(episode_zero_head(learner.module.head, task.support_y))
            return self._steps(learner, task.support_x, task.support_y, context)
        if self.inner_checkpointing and context.training:
            return checkpointed_sgd(self.metasgd.module, self._rates(), task.support_x, task.support_y,
                                    context.loss_fn, self.steps(context))
        return self._steps(self.metasgd.clone(), task.support_x, task.support_y, context)

    def vectorised_adapt(self, support_x: Tensor, support_y: Tensor, context: Context,
                         support_mask: Tensor | None = None) -> Callable[..., Tensor]:
        start, classes = self._vectorised_zero_head(self.metasgd.module.head, support_y)  # head rates broadcast
        return vectorised_sgd(self.metasgd.module, self._rates(), support_x, support_y, context.loss_fn,
                              self.steps(context), self.metasgd.first_order or not context.training, support_mask,
                              start, classes)

    def _rates(self) -> dict[str, Tensor]:
        """Each parameter's learned rates α (learn2learn keeps one tensor per parameter, in parameter order)."""
        names = (name for name, _ in self.metasgd.module.named_parameters())
        return dict(zip(names, self.metasgd.lrs, strict=True))

    def fit_report(self) -> FitReport:
        rates = torch.cat([lr.detach().flatten() for lr in self.metasgd.lrs]).cpu()
        metrics = {"metasgd/lr_mean": rates.mean().item(), "metasgd/lr_std": rates.std().item(),
                   "metasgd/lr_min": rates.min().item(), "metasgd/lr_max": rates.max().item(),
                   "metasgd/lr_negative_fraction": (rates < 0).float().mean().item()}
        from matplotlib.figure import Figure  # here, when drawn; a plain Figure: no pyplot, no screen backend

        figure = Figure(figsize=(6, 4))
        axes = figure.subplots()
        axes.hist(rates.numpy(), bins=60)
        axes.set(xlabel="learned inner learning rate α", ylabel="parameters",
                 title=f"Meta-SGD rates ({rates.numel()} parameters)")
        figure.tight_layout()
        return FitReport(metrics, {"metasgd_lrs.png": figure})
