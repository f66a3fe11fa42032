"""The unit of data in meta-learning: a task (a support and a query set) and a meta-batch of tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Inputs = Tensor | dict[str, Tensor]  # images and vectors are tensors; a text family may give token ids and masks


@dataclass
class Task:
    """One episode. Shapes: ``support_x`` (S, *x), ``support_y`` (S, *y), ``query_x`` (Q, *x), ``query_y`` (Q, *y);
    an input may be a dict of such tensors (e.g. ``{"ids": (S, L), "mask": (S, L)}``)."""

    support_x: Inputs
    support_y: Tensor
    query_x: Inputs
    query_y: Tensor


@dataclass
class Episodes:
    """A meta-batch of T tasks.

    Stacked (every task of one shape, as fixed N-way K-shot families draw them): each field is one tensor
    with the tasks along dim 0, ``support_x`` (T, S, *x) … ``query_y`` (T, Q, *y); vectorised backends need
    this. Ragged (tasks with their own ways and shots, as Meta-Dataset draws them): each field is a list
    of T per-task values; backends that go task by task take both. :meth:`of` builds either. ``source``: the
    source every task was drawn from, where a family evaluates several apart (``task=multi_source``), else ``None``.
    """

    support_x: Any  # Inputs stacked along dim 0, or a list of T Inputs
    support_y: Any
    query_x: Any
    query_y: Any
    source: str | None = None

    @classmethod
    def of(cls, tasks: Sequence[Task], source: str | None = None) -> Episodes:
        """Stack ``tasks`` when they share every shape, else keep them as lists."""
        fields = [[getattr(task, name) for task in tasks] for name in ("support_x", "support_y", "query_x", "query_y")]
        if all(_same_shapes(values) for values in fields):
            return cls(*(_stack(values) for values in fields), source=source)
        return cls(*fields, source=source)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.support_y, list)

    def __len__(self) -> int:
        return len(self.support_y)

    def __getitem__(self, index: int | slice) -> Any:
        """``episodes[i]`` is task i (a :class:`Task`); ``episodes[a:b]`` a smaller meta-batch."""
        parts = (_index(value, index) for value in (self.support_x, self.support_y, self.query_x, self.query_y))
        return Task(*parts) if isinstance(index, int) else Episodes(*parts, source=self.source)

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episodes:
        return Episodes(*(_to(value, device, non_blocking) for value in
                          (self.support_x, self.support_y, self.query_x, self.query_y)), source=self.source)


def _index(value: Any, index: int | slice) -> Any:
    if isinstance(value, dict):
        return {key: _index(item, index) for key, item in value.items()}
    return value[index]


def _to(value: Any, device: torch.device | str, non_blocking: bool) -> Any:
    if isinstance(value, dict):
        return {key: _to(item, device, non_blocking) for key, item in value.items()}
    if isinstance(value, list):
        return [_to(item, device, non_blocking) for item in value]
    return value.to(device, non_blocking=non_blocking)


def _shapes(value: Inputs) -> Any:
    return {key: item.shape for key, item in value.items()} if isinstance(value, dict) else value.shape


def _same_shapes(values: list[Inputs]) -> bool:
    return all(_shapes(value) == _shapes(values[0]) for value in values)


def _stack(values: list[Inputs]) -> Inputs:
    if isinstance(values[0], dict):
        return {key: torch.stack([value[key] for value in values]) for key in values[0]}
    return torch.stack(values)
