"""The inner loop of the MAML family for a whole meta-batch at once, with ``torch.func``.

``vmap`` over tasks of (``grad`` of the support loss through ``functional_call`` → SGD step), then of the
query prediction with each task's adapted weights. Each task keeps its own batch-norm statistics (``vmap``
maps the task dimension away, so every batch-norm call sees one task's samples only; in eval mode the
running statistics, read only), and the outer backward goes through ``grad`` as through learn2learn's
``clone()/adapt()``: the two give the same meta-gradient (tests/test_backends.py).

A ragged meta-batch (tasks of their own sizes) runs padded (:mod:`metalab.runner.padding`): each task's support
and query sets repeated to the meta-batch's largest, with a mask of the real examples. The padded examples weigh
zero everywhere they could count: the losses are masked means (:func:`masked_mean`) and batch norm leaves them
out of its statistics (:class:`ExampleMask`), so each task's losses, predictions and meta-gradient are those of
its unpadded sets (tests/test_vmap_ragged.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

LossFn = Callable[[Tensor, Tensor], Tensor]


class ExampleMask:
    """Which examples of the batch being forwarded are real, for batch norm's statistics: ``current`` is a bool
    tensor (N,) while a padded batch goes through the network (set by :func:`vectorised_sgd` around each forward,
    under ``vmap`` one task's mask), ``None`` when every example is real."""

    def __init__(self) -> None:
        self.current: Tensor | None = None


def _batch_norm_from_primitives(module: nn.modules.batchnorm._BatchNorm,
                                examples: ExampleMask | None = None) -> Callable[[Tensor], Tensor]:
    """Batch norm written with elementary ops: the batch's statistics in training mode, the running ones in
    eval mode (``algorithm.eval_batch_norm=running``), as ``nn.BatchNorm`` normalises. With a mask in
    ``examples``, the batch's statistics are its real examples' alone: each padded example weighs zero in the
    mean and the (biased) variance, so the real examples are normalised exactly as without the padding, and the
    padded ones (normalised too, but weighing zero in every loss) pass no gradient to them.

    ``torch.batch_norm``'s own double-backward gives wrong second-order gradients under ``vmap`` (seen with
    torch 2.14: the meta-gradient of a conv bias before batch norm, which must be zero, was not). These
    ops differentiate correctly to any order. The running buffers are never written: the learner updates
    them once per meta-iteration, outside the runner, whatever the backend."""

    def forward(x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]  # every dimension but the channels: (N, C, ...) → per channel
        shape = [1, -1, *[1] * (x.dim() - 2)]
        if not module.training and module.running_mean is not None:
            mean, variance = module.running_mean.view(shape), module.running_var.view(shape)
        elif examples is None or examples.current is None:
            mean = x.mean(dims, keepdim=True)
            variance = (x - mean).pow(2).mean(dims, keepdim=True)
        else:
            weight = examples.current.to(x.dtype).view(-1, *[1] * (x.dim() - 1))  # (N, 1, ...): 1 real, 0 padded
            count = weight.sum() * x[0, 0].numel()  # real examples × positions per channel
            mean = (x * weight).sum(dims, keepdim=True) / count
            variance = ((x - mean).pow(2) * weight).sum(dims, keepdim=True) / count
        normalised = (x - mean) / torch.sqrt(variance + module.eps)
        if module.affine:
            normalised = normalised * module.weight.view(shape) + module.bias.view(shape)
        return normalised

    return forward


@contextmanager
def batch_statistics_only(network: nn.Module, examples: ExampleMask | None = None) -> Iterator[None]:
    """Every batch norm of ``network`` normalises by elementary ops (batch statistics in training mode, of the
    real examples alone while ``examples`` holds a mask)."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.forward = _batch_norm_from_primitives(module, examples)
    try:
        yield
    finally:
        for module in norms:
            del module.forward


def vectorised_sgd(network: nn.Module, rates: dict[str, Tensor | float], support_x: Tensor, support_y: Tensor,
                   loss_fn: LossFn, steps: int, first_order: bool, support_mask: Tensor | None = None,
                   start: dict[str, Tensor] | None = None, classes: Tensor | None = None) -> Callable[..., Tensor]:
    """Adapt every task of a stacked meta-batch by ``steps`` inner SGD steps at once; return the predictor
    of the stacked queries, (T, Q, *x) → (T, Q, *out).

    ``rates`` maps the names of the parameters the inner loop updates to their step size (a float, or a
    tensor shaped like the parameter for Meta-SGD); the other parameters are shared as they are.

    A padded meta-batch (module docstring) gives ``support_mask`` (T, S), true for each task's real support
    examples, and the predictor its ``query_mask`` (T, Q): the support loss is then the masked mean, and batch
    norm's statistics are the real examples'. Without masks, nothing is masked (no extra work).

    ``start``: where the inner loop starts for some of ``rates``' parameters instead of their values, the same
    for every task (a zero head, :func:`~metalab.algorithms.base.episode_zero_head`, of the meta-batch's largest
    ways W). ``classes`` (T, W) bool: the classes each task has; the outputs (logits) of the others are set to
    the dtype's lowest value before every loss, so their softmax probability is exactly 0: they add nothing to a
    cross-entropy, pass no gradient back (their head rows stay zero), and each task learns as with a head of its
    own ways.

    The adaptation runs when the predictor is called, fused with the query forward in one ``vmap``: a
    second ``vmap`` over the adapted weights cost ~10% of a sinusoid meta-iteration.
    """
    parameters = dict(network.named_parameters())
    buffers = dict(network.named_buffers())
    fixed = {name: value for name, value in parameters.items() if name not in rates}
    initial = {name: parameters[name] for name in rates} | (start or {})
    examples = ExampleMask()

    def forward(weights: dict[str, Tensor], x: Tensor, mask: Tensor | None, present: Tensor | None) -> Tensor:
        examples.current = mask  # what batch norm reads during this forward
        try:
            outputs = functional_call(network, (weights | fixed, buffers), (x,))
        finally:
            examples.current = None
        return outputs if present is None else outputs.masked_fill(~present, torch.finfo(outputs.dtype).min)

    def support_loss(weights: dict[str, Tensor], sx: Tensor, sy: Tensor, sm: Tensor | None,
                     present: Tensor | None) -> Tensor:
        prediction = forward(weights, sx, sm, present)
        return loss_fn(prediction, sy) if sm is None else masked_mean(loss_fn, prediction, sy, sm)

    def adapted_weights(sx: Tensor, sy: Tensor, sm: Tensor | None, present: Tensor | None) -> dict[str, Tensor]:
        fast = initial
        for _ in range(steps):
            gradients = grad(support_loss)(fast, sx, sy, sm, present)
            if first_order:
                gradients = {name: g.detach() for name, g in gradients.items()}
            fast = {name: fast[name] - rates[name] * gradients[name] for name in fast}
        return fast

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, sm: Tensor | None, qm: Tensor | None,
                 present: Tensor | None) -> Tensor:
        return forward(adapted_weights(sx, sy, sm, present), qx, qm, present)

    def predict(query_x: Tensor, query_mask: Tensor | None = None) -> Tensor:
        if (support_mask is None) != (query_mask is None):
            raise ValueError("a padded meta-batch needs both masks: support_mask and query_mask")
        extras = (support_mask, query_mask, classes)  # None: not batched, passed as is
        with batch_statistics_only(network, examples):
            return vmap(one_task, in_dims=(0, 0, 0, *(None if e is None else 0 for e in extras)),
                        randomness="different")(support_x, support_y, query_x, *extras)

    return predict


def masked_mean(loss_fn: LossFn, predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``loss_fn``'s value on the examples where ``mask`` (N,) is true, from all N: Σ m_i ℓ_i / Σ m_i, where ℓ_i
    is ``loss_fn`` on example i alone. For a loss that is a mean over its examples (``F.cross_entropy``,
    ``F.mse_loss``: every example has the same number of elements) this is the loss of the real examples, and a
    padded one gets zero gradient. Padded examples must be finite (repeated real ones are): 0 · NaN is NaN."""
    per_example = vmap(lambda p, t: loss_fn(p.unsqueeze(0), t.unsqueeze(0)))(predictions, targets)  # (N,)
    weight = mask.to(per_example.dtype)
    return (per_example * weight).sum() / weight.sum()


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
