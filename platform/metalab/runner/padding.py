"""A ragged meta-batch as one padded, stacked one, for ``runner.backend=vmap``.

Each task's support set is padded to the meta-batch's largest S and its query set to the largest Q by
repeating its own examples (example i of the padding is real example i mod n), with a mask of the real ones
(T, S) and (T, Q). Repeated real examples rather than zeros: every value a padded example produces is then one
a real example produces too, so none is NaN or infinite, and weighing it zero (0 · ℓ) really removes it. The
vectorised inner loop weighs them zero in the losses and in batch norm's statistics
(:func:`~metalab.algorithms.functional.vectorised_sgd`), which makes each task's result its unpadded one.

Only the examples are padded here: every task must have the same shape of input and of target per example.
Ways are not padded by the data: an algorithm with a head of one output per way sees one number of ways
(``checks.py`` refuses it on Meta-Dataset's episodes), and a zero head per episode (``algorithm.zero_head``) is one
of the meta-batch's largest ways for every task, the classes a task lacks masked out of its softmax
(:meth:`~metalab.algorithms.GradientBasedAlgorithm._vectorised_zero_head`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metalab.errors import ConfigError
from metalab.tasks.episodes import Episodes, Inputs


@dataclass
class Padded:
    """A padded meta-batch: ``support_x`` (T, S, *x), ``support_y`` (T, S, *y), ``support_mask`` (T, S) bool,
    likewise for the queries; ``query_sizes``: each task's real Q, to cut its predictions back to them."""

    support_x: Inputs
    support_y: Tensor
    support_mask: Tensor
    query_x: Inputs
    query_y: Tensor
    query_mask: Tensor
    query_sizes: list[int]


def pad(episodes: Episodes) -> Padded:
    """``episodes`` (ragged) padded to its largest support and query sets."""
    support_x, support_y, support_mask = _pad_sets(episodes.support_x, episodes.support_y, "support")
    query_x, query_y, query_mask = _pad_sets(episodes.query_x, episodes.query_y, "query")
    return Padded(support_x, support_y, support_mask, query_x, query_y, query_mask,
                  [len(targets) for targets in episodes.query_y])


def _pad_sets(inputs: list[Inputs], targets: list[Tensor], which: str) -> tuple[Inputs, Tensor, Tensor]:
    sizes = [len(y) for y in targets]
    largest = max(sizes)
    indices = [torch.arange(largest, device=y.device) % size for y, size in zip(targets, sizes, strict=True)]
    mask = torch.stack([torch.arange(largest, device=y.device) < size for y, size in zip(targets, sizes, strict=True)])
    try:
        padded_x = _stack([_take(x, index) for x, index in zip(inputs, indices, strict=True)])
        padded_y = torch.stack([y[index] for y, index in zip(targets, indices, strict=True)])
    except RuntimeError as error:  # torch.stack: "stack expects each tensor to be equal size"
        raise ConfigError(f"runner.backend=vmap pads a meta-batch's {which} sets to one size, but its tasks' "
                          f"examples differ in shape ({' '.join(str(error).split())[:120]}): use runner.backend=loop, "
                          "threads or auto") from None
    return padded_x, padded_y, mask


def _take(value: Inputs, index: Tensor) -> Inputs:
    if isinstance(value, dict):
        return {key: item[index] for key, item in value.items()}
    return value[index]


def _stack(values: list[Any]) -> Inputs:
    if isinstance(values[0], dict):
        return {key: torch.stack([value[key] for value in values]) for key in values[0]}
    return torch.stack(values)
