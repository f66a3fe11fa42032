"""R2-D2: a ridge-regression classifier fitted in closed form to each episode's support embeddings.

Reference: Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable closed-form solvers", ICLR 2019
(§3.2 "R2-D2"). The base learner is ridge regression from the embedding to one-hot targets, solved exactly; its
solution is a differentiable function of the embedding, so the meta-gradient reaches the embedding through it. With
S support examples of D features the Woodbury identity gives the solution from an S × S system, cheap when S ≪ D.
Meta-learned with the embedding (Figure 1: "together with the hyper-parameters of the R.R. layer"): λ and the
"adjust" layer's scale α and bias β that turn the regression's outputs into logits.

As the authors' code (github.com/bertinetto/r2d2, ``fewshots/models/r2d2.py``): a column of ones is appended to the
support features (the regression's bias), features and targets are divided by √S, and the adjust layer starts at
α = 1e-4, β = 0 (``AdjustLayer``) with λ = 50 (``init_lambda``). Unlike their default (``learn_lambda: False``),
λ is learned here unless ``learn_lambda`` is false, as log λ so it stays positive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import BATCH_NORM_MODES, BatchNormMode, Context, MetaAlgorithm, Predictor, concatenated
from metalab.algorithms.protonet import PrototypeBased
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Inputs, Task

Head = Callable[[Tensor, Tensor, Tensor], Tensor]  # (support (S, D), labels (S,), query (Q, D)) → logits (Q, N)


def ridge_regression(x: Tensor, y: Tensor, lam: Tensor | float) -> Tensor:
    """``W = argmin ‖xW − y‖² + λ‖W‖²`` for ``x`` (S, D) and ``y`` (S, N): (D, N), in closed form.

    ``W = (xᵀx + λI_D)⁻¹ xᵀy = xᵀ(xxᵀ + λI_S)⁻¹ y`` (Woodbury), solved as whichever system is smaller: the S × S
    one when S ≤ D (few-shot episodes), else the D × D one. Differentiable in ``x``, ``y`` and ``λ``."""
    samples, features = x.shape
    if samples <= features:
        gram = x @ x.T + lam * torch.eye(samples, dtype=x.dtype, device=x.device)  # (S, S)
        return x.T @ torch.linalg.solve(gram, y)
    gram = x.T @ x + lam * torch.eye(features, dtype=x.dtype, device=x.device)  # (D, D)
    return torch.linalg.solve(gram, x.T @ y)


def support_set_classifier(embedding: nn.Module, task: Task, head: Head) -> Predictor:
    """The predictor of ``task``'s queries whose logits ``head`` computes from the episode's embeddings: support and
    queries embedded in one batch, as ProtoNet's (batch norm sees the whole episode)."""
    samples = len(task.support_y)

    def predict(query_x: Inputs) -> Tensor:
        features = embedding(concatenated(task.support_x, query_x)).flatten(1)  # (S + Q, D)
        return head(features[:samples], task.support_y, features[samples:])

    return predict


def check_batch_norm_mode(eval_batch_norm: str) -> None:
    if eval_batch_norm not in BATCH_NORM_MODES:
        raise ConfigError(f"algorithm.eval_batch_norm must be transductive or running, got {eval_batch_norm!r}")


class R2D2(PrototypeBased, MetaAlgorithm):
    """Arguments: ``model`` (its ``features`` are the embedding, else the whole model), ``ridge_lambda`` (λ, or its
    start when learned: 50, the authors'), ``learn_lambda`` (true: λ is meta-learned, as log λ), ``scale`` (the
    adjust layer's α at the start: 1e-4, the authors'; β starts at 0; both meta-learned), ``eval_batch_norm``
    (``transductive`` or ``running``, as :class:`~metalab.algorithms.ProtoNet`).

    Example::

        algorithm = R2D2(CNN4(ways=5), ridge_lambda=50.0)
        logits = algorithm.adapt(task, context)(task.query_x)  # (Q, ways): ridge regression fitted to the support set
    """

    def __init__(self, model: nn.Module, ridge_lambda: float = 50.0, learn_lambda: bool = True, scale: float = 1e-4,
                 eval_batch_norm: BatchNormMode = "transductive") -> None:
        super().__init__()
        if ridge_lambda <= 0:
            raise ConfigError(f"algorithm.ridge_lambda must be > 0, got {ridge_lambda}")
        if scale == 0:
            raise ConfigError("algorithm.scale must not be 0 (every logit would be the bias alone): the authors' "
                              "start is 1e-4")
        check_batch_norm_mode(eval_batch_norm)
        self.network, self.eval_batch_norm = model, eval_batch_norm
        log_lambda = torch.tensor(math.log(ridge_lambda))
        if learn_lambda:
            self.log_lambda = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_lambda", log_lambda)
        self.scale = nn.Parameter(torch.tensor(float(scale)))  # the adjust layer's α
        self.bias = nn.Parameter(torch.tensor(0.0))  # and its β

    def adapt(self, task: Task, context: Context) -> Predictor:
        return support_set_classifier(self.embedding, task, self.logits)

    def logits(self, support: Tensor, labels: Tensor, query: Tensor) -> Tensor:
        """``α (x_q W + b) + β``, with ``[W; b]`` the ridge regression of the one-hot labels on ``[support, 1]``,
        both divided by √S as the authors'."""
        samples = len(support)
        one_hot = F.one_hot(labels).to(support.dtype)  # (S, N)
        augmented = torch.cat([support, support.new_ones(samples, 1)], 1) / math.sqrt(samples)  # (S, D + 1)
        weights = ridge_regression(augmented, one_hot / math.sqrt(samples), self.log_lambda.exp())  # (D + 1, N)
        return self.scale * (query @ weights[:-1] + weights[-1]) + self.bias  # (Q, N)
