"""Per-task work, one task after another or spread over CPU threads; and handing Lightning a loss whose
backward delivers gradients computed beforehand.

Why threads: on a CPU, one small task (a 5-way 1-shot CNN4 episode) keeps PyTorch's intra-op threads
poorly busy. Giving each of ``n`` workers whole tasks with one intra-op thread each ran 1.3× the loop's
meta-iterations/s on 2 cores (benchmarks/backends.py --device cpu). The per-task computation is exactly
the loop's (the algorithm's ``task_meta_gradient``); only the scheduling differs, and results come back in task
order, so sums over tasks do not depend on which thread finished first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

Result = TypeVar("Result")


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="metalab-task")


@contextmanager
def _one_intra_op_thread() -> Iterator[int]:
    """Yield the number of intra-op threads there were (the workers); inside, each op runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def map_tasks(work: Callable[[int], Result], num_tasks: int, threaded: bool) -> list[Result]:
    """``[work(0), ..., work(num_tasks - 1)]``, computed in this thread or by CPU worker threads."""
    if not threaded:
        return [work(index) for index in range(num_tasks)]
    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: workers take the caller's

    def in_worker(index: int) -> Result:
        with torch.set_grad_enabled(grad_enabled):
            return work(index)

    with _one_intra_op_thread() as workers:
        return list(_pool(workers).map(in_worker, range(num_tasks)))


def with_gradient(value: Tensor, parameters: list[nn.Parameter], gradients: list[Tensor | None]) -> Tensor:
    """``value`` (a scalar computed without a graph) whose gradient in ``parameters`` is ``gradients``.

    Lets the loop compute each task's meta-gradient as soon as the task is done, freeing its graph (as the
    plain learn2learn loop does with one ``backward()`` per task), while Lightning still calls
    ``backward()`` on the meta-loss: any factor Lightning applies (gradient accumulation, AMP scaling)
    reaches the parameters through ``grad_output``.
    """
    return _KnownGradient.apply(value.detach(), gradients, *parameters)


class _KnownGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, value: Tensor, gradients: list[Tensor | None], *parameters: nn.Parameter) -> Tensor:
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (None, None, *(None if g is None else g * grad_output for g in ctx.gradients))
