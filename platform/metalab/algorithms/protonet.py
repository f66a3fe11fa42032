"""Prototypical Networks: classify queries by their distance to each class's mean support embedding.

Reference: Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import (
    BATCH_NORM_MODES,
    BatchNormMode,
    Context,
    MetaAlgorithm,
    Predictor,
    concatenated,
    joined_inputs,
)
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task


class PrototypeBased:
    """What algorithms whose classifier is built from an episode's prototypes share (mixed in before
    :class:`MetaAlgorithm`): the embedding is ``model.features`` when the model has one (its head is unused),
    any number of ways, and no "before adaptation" predictor."""

    problems = ("classification",)
    one_output_per_way = False  # prototypes, not a head: any number of ways, in training and test alike
    network: nn.Module

    @property
    def model(self) -> nn.Module:
        return self.network

    @property
    def embedding(self) -> nn.Module:
        return getattr(self.network, "features", self.network)

    def update_running_statistics(self, task: Task, context: Context) -> None:
        """The embedding of the episode's support and queries in one batch, as the predictor embeds them (the
        head is never used)."""
        self.embedding(joined_inputs(task))

    def unadapted(self, task: Task, context: Context) -> None:
        """No ``pre_*`` metrics: the model's head is never used, and the unadapted embedding's classifier is
        built from the support set, as :meth:`adapt` builds it."""
        return None


class ProtoNet(PrototypeBased, MetaAlgorithm):
    """No inner loop: "adapting" to a task computes its class prototypes.

    The embedding is ``model.features`` when the model has one (its head is unused), else the model.
    ``distance``: ``euclidean`` (squared, as the paper) or ``cosine`` (scaled by ``temperature``).
    ``eval_batch_norm``: ``running`` embeds evaluation episodes with the batch-norm running statistics, as
    the authors' code does (``model.eval()`` in ``protonets/utils/model.py``), so each image's embedding is
    its own; ``transductive`` normalises each episode by its own batch statistics (support and queries
    together). The running statistics follow the training episodes' embedding forward (support and queries
    in one batch), one momentum step per meta-iteration, as in the authors' code with one episode a step.
    """

    def __init__(self, model: nn.Module, distance: Literal["euclidean", "cosine"] = "euclidean",
                 temperature: float = 10.0, eval_batch_norm: BatchNormMode = "transductive") -> None:
        super().__init__()
        if distance not in ("euclidean", "cosine"):
            raise ConfigError(f"algorithm.distance must be euclidean or cosine, got {distance!r}")
        if temperature <= 0:
            raise ConfigError(f"algorithm.temperature must be > 0, got {temperature}")
        if eval_batch_norm not in BATCH_NORM_MODES:
            raise ConfigError(f"algorithm.eval_batch_norm must be transductive or running, got {eval_batch_norm!r}")
        self.network = model
        self.distance, self.temperature, self.eval_batch_norm = distance, temperature, eval_batch_norm

    def adapt(self, task: Task, context: Context) -> Predictor:
        return PrototypeClassifier(self.embedding, task.support_x, task.support_y, self.distance, self.temperature)


class PrototypeClassifier(nn.Module):
    """Logits of queries against the prototypes of one task's support set.

    Support and queries are embedded in one batch, as the reference implementations do, so batch
    normalisation sees the whole episode.
    """

    def __init__(self, embedding: nn.Module, support_x: Tensor, support_y: Tensor, distance: str,
                 temperature: float) -> None:
        super().__init__()
        self.embedding, self.support_x, self.support_y = embedding, support_x, support_y
        self.distance, self.temperature = distance, temperature

    def forward(self, query_x: Tensor) -> Tensor:
        embedded = self.embedding(concatenated(self.support_x, query_x)).flatten(1)  # (S + Q, D)
        support, query = embedded[: len(self.support_y)], embedded[len(self.support_y):]
        one_hot = F.one_hot(self.support_y).to(support.dtype)  # (S, N)
        prototypes = (one_hot.T @ support) / one_hot.sum(0, keepdim=True).T  # (N, D)
        if self.distance == "cosine":
            return self.temperature * F.normalize(query, dim=1) @ F.normalize(prototypes, dim=1).T
        return -torch.cdist(query, prototypes).pow(2)  # (Q, N)
