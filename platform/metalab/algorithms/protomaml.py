"""Proto-MAML: MAML whose output layer starts each episode from the Prototypical Network's classifier.

Reference: Triantafillou et al., "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples",
ICLR 2020, §3 ("Proto-MAML"), Meta-Dataset's strongest baseline; first order by default (fo-Proto-MAML).

Per episode: embed the support set, take each class's mean (its prototype c_k) and start the linear head at
``W_k = 2 c_k``, ``b_k = −‖c_k‖²`` (squared Euclidean distance to the prototypes as a linear layer, up to a
term the same for every class); then take ``inner_steps`` SGD steps on the support loss, embedding and head
together. The head's start is a function of the embedding, so the meta-gradient reaches the embedding through
the prototypes as well as through the adapted weights. Any number of ways: the head has one row per way of
the episode, so Meta-Dataset's variable-way episodes work (``one_output_per_way = False``); the model's own
head is unused.

Written with ``torch.func.functional_call`` rather than learn2learn's ``clone()/adapt()``: learn2learn's
``MAML`` adapts a module's own parameters, and this head is not a parameter but a function of the episode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.base import BATCH_NORM_MODES, BatchNormMode, Context, GradientBasedAlgorithm, Predictor
from metalab.algorithms.protonet import PrototypeBased
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task


class ProtoMAML(PrototypeBased, GradientBasedAlgorithm):
    """Arguments: ``model`` (its ``features`` are the embedding, else the whole model), ``inner_lr``,
    ``inner_steps``, ``eval_inner_steps`` (``None``: ``inner_steps``), ``first_order`` (the paper's default:
    true), ``eval_batch_norm`` (``transductive`` or ``running``, as :class:`~metalab.algorithms.ProtoNet`)."""

    thread_safe = False  # functional_call swaps the embedding's parameters while it runs: runner.backend=loop

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 eval_inner_steps: int | None = None, first_order: bool = True,
                 eval_batch_norm: BatchNormMode = "transductive") -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        if eval_batch_norm not in BATCH_NORM_MODES:
            raise ConfigError(f"algorithm.eval_batch_norm must be transductive or running, got {eval_batch_norm!r}")
        self.network, self.inner_lr, self.first_order = model, inner_lr, first_order
        self.eval_batch_norm = eval_batch_norm

    def adapt(self, task: Task, context: Context) -> Predictor:
        weights = {name: p for name, p in self.embedding.named_parameters() if p.requires_grad}
        embed = self._embedder()
        head = prototype_head(embed(weights, task.support_x), task.support_y)
        # In evaluation no graph goes back to the initialisation: first-order steps give the same weights.
        second_order = context.training and not self.first_order
        for _ in range(self.steps(context)):
            names, values = [*weights, "head.weight", "head.bias"], [*weights.values(), *head.values()]
            if not second_order:  # the step's gradient as a constant: taken on detached copies, so the graph
                values = [value.detach().requires_grad_() for value in values]  # to θ (prototypes) stays whole
            at = dict(zip(names, values, strict=True))
            at_head = {"weight": at.pop("head.weight"), "bias": at.pop("head.bias")}
            loss = context.loss_fn(linear(embed(at, task.support_x), at_head), task.support_y)
            gradients = torch.autograd.grad(loss, values, create_graph=second_order)
            current = [*weights.values(), *head.values()]
            stepped = {name: value - self.inner_lr * gradient
                       for name, value, gradient in zip(names, current, gradients, strict=True)}
            head = {"weight": stepped.pop("head.weight"), "bias": stepped.pop("head.bias")}
            weights = stepped
        return lambda x: linear(embed(weights, x), head)

    def _embedder(self) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """``embed(weights, x)``: the embedding with ``weights`` for its trainable parameters, flattened."""
        embedding = self.embedding
        frozen = {name: p for name, p in embedding.named_parameters() if not p.requires_grad}
        buffers = dict(embedding.named_buffers())

        def embed(weights: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(embedding, (weights | frozen, buffers), (x,)).flatten(1)

        return embed


def prototype_head(support: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The linear layer equal to the squared-Euclidean prototype classifier up to a per-query constant:
    ``−‖x − c_k‖² = 2 c_k·x − ‖c_k‖² − ‖x‖²``, so ``W_k = 2 c_k``, ``b_k = −‖c_k‖²``."""
    one_hot = F.one_hot(labels).to(support.dtype)  # (S, N)
    prototypes = (one_hot.T @ support) / one_hot.sum(0).unsqueeze(1)  # (N, D)
    return {"weight": 2 * prototypes, "bias": -prototypes.pow(2).sum(1)}


def linear(features: Tensor, head: dict[str, Tensor]) -> Tensor:
    return F.linear(features, head["weight"], head["bias"])
