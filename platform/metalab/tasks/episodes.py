"""The unit of data in meta-learning: a meta-batch of tasks, each a support and a query set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Episodes:
    """T tasks stacked along dim 0, every task with the same shapes.

    Shapes: ``support_x`` (T, S, *x), ``support_y`` (T, S, *y), ``query_x`` (T, Q, *x),
    ``query_y`` (T, Q, *y). A dataclass, so Lightning moves it to the device as one batch.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index: int | slice) -> Episodes:
        return Episodes(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])
