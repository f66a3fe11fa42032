"""The unit of data in meta-learning: a meta-batch of tasks, each a support and a query set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Episodes:
    """T tasks stacked along dim 0, every task with the same shapes.

    Shapes: ``support_x`` (T, S, *x), ``support_y`` (T, S, *y), ``query_x`` (T, Q, *x),
    ``query_y`` (T, Q, *y).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episodes:
        return Episodes(*(t.to(device, non_blocking=non_blocking) for t in
                          (self.support_x, self.support_y, self.query_x, self.query_y)))

    def __getitem__(self, index: int | slice) -> Episodes:
        return Episodes(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])
