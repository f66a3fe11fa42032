"""``runner.backend=vmap`` on ragged meta-batches (tasks of their own support and query sizes): padded to the
largest sets with masks, each task's loss, predictions and meta-gradient are the loop's, batch norm included;
stacked meta-batches are not padded."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import ANIL, MAML, Context, MetaAlgorithm, MetaSGD
from metalab.algorithms.functional import ExampleMask, batch_statistics_only
from metalab.errors import ConfigError
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner, pads_ragged
from metalab.runner import task_runner as task_runner_module
from metalab.tasks.episodes import Episodes, Task
from tests.test_architecture import OneStepSGD
from tests.test_backends import image_tasks

ALGORITHMS = {
    "maml": lambda model: MAML(model, inner_lr=0.1, inner_steps=2),
    "fomaml": lambda model: MAML(model, inner_lr=0.1, inner_steps=2, first_order=True),
    "metasgd": lambda model: MetaSGD(model, inner_lr=0.1, inner_steps=2),
    "anil": lambda model: ANIL(model, inner_lr=0.1, inner_steps=2),
}


def ragged_regression(generator: torch.Generator) -> Episodes:
    """Sine tasks with 3, 8 and 5 support points and 6, 2 and 9 queries."""
    tasks = []
    for shots, queries in [(3, 6), (8, 2), (5, 9)]:
        amplitude, phase = 0.1 + 4.9 * torch.rand(2, generator=generator, dtype=torch.double)
        x = 10 * torch.rand(shots + queries, 1, generator=generator, dtype=torch.double) - 5
        y = amplitude * torch.sin(x + phase)
        tasks.append(Task(x[:shots], y[:shots], x[shots:], y[shots:]))
    return Episodes.of(tasks)


def ragged_images(generator: torch.Generator, ways: int = 3) -> Episodes:
    """3-way image tasks of 1, 3 and 2 shots and 2, 1 and 3 queries per class (16×16, one channel)."""
    tasks = []
    for shots, queries in [(1, 2), (3, 1), (2, 3)]:
        support_y, query_y = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)
        tasks.append(Task(torch.randn(len(support_y), 1, 16, 16, generator=generator, dtype=torch.double), support_y,
                          torch.randn(len(query_y), 1, 16, 16, generator=generator, dtype=torch.double), query_y))
    return Episodes.of(tasks)


def networks() -> dict[str, tuple[torch.nn.Module, Episodes, Callable]]:
    torch.manual_seed(0)
    return {"mlp": (MLP(1, (32, 32), 1).double(), ragged_regression(torch.Generator().manual_seed(0)), F.mse_loss),
            "cnn4_batchnorm": (CNN4(3, 1, image_size=16, hidden_size=8).double(),
                               ragged_images(torch.Generator().manual_seed(0)), F.cross_entropy)}


def meta_step(algorithm: MetaAlgorithm, tasks: Episodes, loss_fn, backend: str):
    """(predictions, meta-loss, meta-gradient) of one meta-iteration with ``backend``."""
    algorithm.zero_grad()
    predictions, loss = TaskRunner(backend).meta_loss(algorithm, tasks, Context(loss_fn, training=True))
    loss.backward()
    return predictions, loss.detach(), [p.grad.clone() for p in algorithm.parameters() if p.grad is not None]


@pytest.mark.parametrize("network", ["mlp", "cnn4_batchnorm"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_vmap_ragged_matches_loop(name: str, network: str) -> None:
    model, tasks, loss_fn = networks()[network]
    assert not tasks.stacked
    loop = meta_step(ALGORITHMS[name](copy.deepcopy(model)), tasks, loss_fn, "loop")
    vmapped = meta_step(ALGORITHMS[name](copy.deepcopy(model)), tasks, loss_fn, "vmap")
    torch.testing.assert_close(vmapped[1], loop[1], rtol=1e-5, atol=1e-10)
    assert len(vmapped[0]) == len(loop[0]) == 3
    for got, expected in zip(vmapped[0], loop[0], strict=True):  # each task's real queries, in its own number
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert len(vmapped[2]) == len(loop[2]) and any(g.abs().sum() > 0 for g in loop[2])
    for got, expected in zip(vmapped[2], loop[2], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)


def test_batch_norm_statistics_leave_the_padding_out() -> None:
    """Masked batch norm normalises the real examples as batch norm on them alone does; unmasked, the repeated
    examples (here 2 of the 3 real ones once more) would shift the statistics."""
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    real = torch.randn(3, 4, 5, 5, dtype=torch.double)
    padded, mask = real[torch.arange(5) % 3], torch.arange(5) < 3
    examples = ExampleMask()
    with batch_statistics_only(norm, examples):
        examples.current = mask
        masked = norm(padded)
        examples.current = None
        unmasked = norm(padded)
    expected = F.batch_norm(real, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    torch.testing.assert_close(masked[:3], expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unmasked[:3], expected, rtol=1e-3)


@pytest.mark.parametrize("network", ["mlp", "cnn4_batchnorm"])
def test_ragged_evaluation_under_vmap_predicts_what_the_loop_does(network: str) -> None:
    model, tasks, loss_fn = networks()[network]
    algorithm, context = MetaSGD(model, inner_lr=0.1, inner_steps=3), Context(loss_fn, training=False)
    runner = TaskRunner("vmap")
    vmapped = runner.predictions(algorithm, tasks, context)
    for got, expected in zip(vmapped, TaskRunner("loop").predictions(algorithm, tasks, context), strict=True):
        assert not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)


def test_a_stacked_meta_batch_is_not_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(episodes: Episodes) -> None:
        raise AssertionError("a stacked meta-batch was padded")

    monkeypatch.setattr(task_runner_module, "pad", refuse)
    algorithm, tasks = MAML(CNN4(3, 1, image_size=16, hidden_size=8).double(), inner_lr=0.1), image_tasks()
    _, loss = TaskRunner("vmap").meta_loss(algorithm, tasks, Context(F.cross_entropy, training=True))
    loss.backward()
    TaskRunner("vmap").predictions(algorithm, tasks, Context(F.cross_entropy, training=False))


def test_auto_probes_vmap_on_ragged_meta_batches_with_the_loops_meta_gradients() -> None:
    model, _, _ = networks()["cnn4_batchnorm"]
    algorithm, auto, loop = MAML(model, inner_lr=0.1), TaskRunner("auto"), TaskRunner("loop")
    generator = torch.Generator().manual_seed(1)
    for step in range(9):  # the probe's steps: warm-up and timed ones for each candidate, maybe a second round
        tasks = ragged_images(generator)
        gradients = []
        for runner in (auto, loop):
            algorithm.zero_grad()
            _, loss = runner.meta_loss(algorithm, tasks, Context(F.cross_entropy, training=True))
            loss.backward()
            gradients.append([p.grad.clone() for p in algorithm.parameters()])
        for got, expected in zip(*gradients, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10, msg=f"step {step}")
    assert "vmap" in auto.probe and not auto.probe["vmap"].startswith("failed"), auto.probe


def test_an_algorithm_whose_vectorised_adapt_takes_no_mask_keeps_ragged_batches_off_vmap() -> None:
    torch.manual_seed(0)
    algorithm, tasks = OneStepSGD(MLP(1, (8,), 1).double()), ragged_regression(torch.Generator().manual_seed(2))
    assert not pads_ragged(algorithm) and pads_ragged(MAML(MLP(1, (8,), 1)))
    with pytest.raises(ConfigError, match=r"^runner.backend=vmap: this task family draws tasks of varying sizes, and "
                                          r"OneStepSGD.vectorised_adapt takes no support_mask"):
        TaskRunner("vmap").meta_loss(algorithm, tasks, Context(F.mse_loss, training=True))
    auto = TaskRunner("auto")
    auto.meta_loss(algorithm, tasks, Context(F.mse_loss, training=True))
    assert "vmap" not in auto.probe
