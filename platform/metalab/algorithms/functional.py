"""The inner loop of the MAML family for a whole meta-batch at once, with ``torch.func``.

``vmap`` over tasks of (``grad`` of the support loss through ``functional_call`` → SGD step), then of the
query prediction with each task's adapted weights. Each task keeps its own batch-norm statistics (``vmap``
maps the task dimension away, so every batch-norm call sees one task's samples only; in eval mode the
running statistics, read only), and the outer backward goes through ``grad`` as through learn2learn's
``clone()/adapt()``: the two give the same meta-gradient (tests/test_backends.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

LossFn = Callable[[Tensor, Tensor], Tensor]


def _batch_norm_from_primitives(module: nn.modules.batchnorm._BatchNorm) -> Callable[[Tensor], Tensor]:
    """Batch norm written with elementary ops: the batch's statistics in training mode, the running ones in
    eval mode (``algorithm.eval_batch_norm=running``), as ``nn.BatchNorm`` normalises.

    ``torch.batch_norm``'s own double-backward gives wrong second-order gradients under ``vmap`` (seen with
    torch 2.14: the meta-gradient of a conv bias before batch norm, which must be zero, was not). These
    ops differentiate correctly to any order. The running buffers are never written: the learner updates
    them once per meta-iteration, outside the runner, whatever the backend."""

    def forward(x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]  # every dimension but the channels: (N, C, ...) → per channel
        shape = [1, -1, *[1] * (x.dim() - 2)]
        if not module.training and module.running_mean is not None:
            mean, variance = module.running_mean.view(shape), module.running_var.view(shape)
        else:
            mean = x.mean(dims, keepdim=True)
            variance = (x - mean).pow(2).mean(dims, keepdim=True)
        normalised = (x - mean) / torch.sqrt(variance + module.eps)
        if module.affine:
            normalised = normalised * module.weight.view(shape) + module.bias.view(shape)
        return normalised

    return forward


@contextmanager
def batch_statistics_only(network: nn.Module) -> Iterator[None]:
    """Every batch norm of ``network`` normalises by elementary ops (batch statistics in training mode)."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.forward = _batch_norm_from_primitives(module)
    try:
        yield
    finally:
        for module in norms:
            del module.forward


def vectorised_sgd(network: nn.Module, rates: dict[str, Tensor | float], support_x: Tensor, support_y: Tensor,
                   loss_fn: LossFn, steps: int, first_order: bool) -> Callable[[Tensor], Tensor]:
    """Adapt every task of a stacked meta-batch by ``steps`` inner SGD steps at once; return the predictor
    of the stacked queries, (T, Q, *x) → (T, Q, *out).

    ``rates`` maps the names of the parameters the inner loop updates to their step size (a float, or a
    tensor shaped like the parameter for Meta-SGD); the other parameters are shared as they are.

    The adaptation runs when the predictor is called, fused with the query forward in one ``vmap``: a
    second ``vmap`` over the adapted weights cost ~10% of a sinusoid meta-iteration.
    """
    parameters = dict(network.named_parameters())
    buffers = dict(network.named_buffers())
    fixed = {name: value for name, value in parameters.items() if name not in rates}

    def forward(weights: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(network, (weights | fixed, buffers), (x,))

    def adapted_weights(sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
        fast = {name: parameters[name] for name in rates}
        for _ in range(steps):
            gradients = grad(lambda weights: loss_fn(forward(weights, sx), sy))(fast)
            if first_order:
                gradients = {name: g.detach() for name, g in gradients.items()}
            fast = {name: fast[name] - rates[name] * gradients[name] for name in fast}
        return fast

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        return forward(adapted_weights(sx, sy), qx)

    def predict(query_x: Tensor) -> Tensor:
        with batch_statistics_only(network):
            return vmap(one_task, randomness="different")(support_x, support_y, query_x)

    return predict


def checkpointed_sgd(module: nn.Module, rates: dict[str, Tensor | float], inputs: Tensor, targets: Tensor,
                     loss_fn: LossFn, steps: int, allow_unused: bool = False) -> Callable[[Tensor], Tensor]:
    """Adapt ``module`` by ``steps`` second-order SGD steps on ``(inputs, targets)``, each step checkpointed;
    return the adapted predictor (``algorithm.inner_checkpointing``).

    ``rates`` as in :func:`vectorised_sgd`. Each step runs under ``torch.utils.checkpoint`` (non-reentrant), so
    the graph keeps only the weights between steps; the outer backward recomputes one step's support forward
    and gradient at a time (as github.com/dbaranchuk/memory-efficient-maml). The same meta-gradient as learn2learn's
    ``clone()/adapt()``, for about one more support forward and backward per step (recomputed in the outer
    backward, plus one forward that checkpoint recomputes when the step's own gradient reads its activations).
    A parameter the support loss does not use (``allow_unused``) keeps its value, as in learn2learn.
    """
    network = task_local_modules(module)  # functional_call swaps tensors: tasks on threads need their own modules
    parameters = dict(module.named_parameters())
    fixed = {name: value for name, value in parameters.items() if name not in rates}

    def forward(weights: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(network, weights | fixed, (x,))

    def sgd_step(*values: Tensor) -> tuple[Tensor, ...]:
        weights = dict(zip(rates, values, strict=True))
        gradients = torch.autograd.grad(loss_fn(forward(weights, inputs), targets), values, create_graph=True,
                                        allow_unused=allow_unused)
        return tuple(value if gradient is None else value - rates[name] * gradient
                     for (name, value), gradient in zip(weights.items(), gradients, strict=True))

    fast = tuple(parameters[name] for name in rates)
    for _ in range(steps):
        fast = checkpoint(sgd_step, *fast, use_reentrant=False)
    adapted = dict(zip(rates, fast, strict=True))
    return lambda x: forward(adapted, x)


def task_local_modules(module: nn.Module) -> nn.Module:
    """``module``'s tree of modules as new objects holding the same parameter and buffer tensors (~0.2 ms for
    CNN4). ``functional_call`` swaps a module's tensors while it runs, so two tasks adapted at once on worker
    threads (``runner.backend=threads``) must not share module objects; a deep copy would copy the tensors."""
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)
    twin.__dict__["_parameters"] = dict(module._parameters)
    twin.__dict__["_buffers"] = dict(module._buffers)
    twin.__dict__["_modules"] = {name: None if child is None else task_local_modules(child)
                                 for name, child in module._modules.items()}
    return twin
