"""Meta-SGD: MAML with a learned inner learning rate per parameter, via learn2learn's ``MetaSGD``.

Reference: Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import learn2learn as l2l
import torch
from torch import Tensor, nn

from metalab.algorithms.base import Context, FitReport, GradientBasedAlgorithm, Predictor
from metalab.algorithms.functional import checkpointed_sgd, vectorised_sgd

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task


class MetaSGD(GradientBasedAlgorithm):
    """Adapt a clone by ``inner_steps`` steps of θ ← θ − α ⊙ ∇L, with α (same shape as θ) meta-learned.

    Arguments: ``inner_lr`` initialises every α; the rest (``inner_checkpointing`` too) as
    :class:`~metalab.algorithms.MAML`.
    At the end of meta-training the learned rates are summarised (``metasgd/lr_mean``, ``_std``,
    ``_min``, ``_max``, ``_negative_fraction``) and their histogram is saved as ``metasgd_lrs.png``.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False,
                 inner_checkpointing: bool = False) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        self._checkpointing(inner_checkpointing, first_order)
        self.metasgd = l2l.algorithms.MetaSGD(model, lr=inner_lr, first_order=first_order)

    @property
    def model(self) -> nn.Module:
        return self.metasgd.module

    def adapt(self, task: Task, context: Context) -> Predictor:
        if self.inner_checkpointing and context.training:
            return checkpointed_sgd(self.metasgd.module, self._rates(), task.support_x, task.support_y,
                                    context.loss_fn, self.steps(context))
        return self._steps(self.metasgd.clone(), task.support_x, task.support_y, context)

    def vectorised_adapt(self, support_x: Tensor, support_y: Tensor, context: Context) -> Callable[[Tensor], Tensor]:
        return vectorised_sgd(self.metasgd.module, self._rates(), support_x, support_y, context.loss_fn,
                              self.steps(context), self.metasgd.first_order or not context.training)

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
