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
from metalab.job import train
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner, pads_ragged
from metalab.runner import task_runner as task_runner_module
from metalab.tasks.episodes import Episodes, Task
from tests.test_architecture import OneStepSGD
from tests.test_backends import image_tasks
from tests.test_meta_dataset_sampling import META_DATASET_KANJI

ALGORITHMS = {
    "maml": lambda model, **zero_head: MAML(model, inner_lr=0.1, inner_steps=2, **zero_head),
    "fomaml": lambda model, **zero_head: MAML(model, inner_lr=0.1, inner_steps=2, first_order=True, **zero_head),
    "metasgd": lambda model, **zero_head: MetaSGD(model, inner_lr=0.1, inner_steps=2, **zero_head),
    "anil": lambda model, **zero_head: ANIL(model, inner_lr=0.1, inner_steps=2, **zero_head),
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


def ragged_images(generator: torch.Generator, ways: tuple[int, ...] = (3, 3, 3)) -> Episodes:
    """Image tasks (16×16, one channel) of ``ways`` ways, 1, 3 and 2 shots and 2, 1 and 3 queries per class."""
    tasks = []
    for count, (shots, queries) in zip(ways, [(1, 2), (3, 1), (2, 3)], strict=True):
        support_y = torch.arange(count).repeat_interleave(shots)
        query_y = torch.arange(count).repeat_interleave(queries)
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


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged_ways", "stacked"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_vmap_zero_head_matches_loop(name: str, ragged: bool) -> None:
    """A zero head per episode under vmap: one of the meta-batch's largest ways for every task, the classes a task
    lacks masked out of its softmax; with batch norm, on ragged ways (4, 2, 5), shots and queries, or stacked."""
    torch.manual_seed(0)
    model, loss_fn = CNN4(5, 1, image_size=16, hidden_size=8).double(), F.cross_entropy  # its own head: 5 ways
    tasks = ragged_images(torch.Generator().manual_seed(0), (4, 2, 5)) if ragged else image_tasks(count=3)
    assert tasks.stacked != ragged
    loop = meta_step(ALGORITHMS[name](copy.deepcopy(model), zero_head=True), tasks, loss_fn, "loop")
    vmapped = meta_step(ALGORITHMS[name](copy.deepcopy(model), zero_head=True), tasks, loss_fn, "vmap")
    torch.testing.assert_close(vmapped[1], loop[1], rtol=1e-5, atol=1e-10)
    for got, expected in zip(vmapped[0], loop[0], strict=True):  # each task's queries and ways
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert len(vmapped[2]) == len(loop[2]) and any(g.abs().sum() > 0 for g in loop[2])
    for got, expected in zip(vmapped[2], loop[2], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    evaluation = Context(loss_fn, training=False)
    vmapped = TaskRunner("vmap").predictions(ALGORITHMS[name](copy.deepcopy(model), zero_head=True), tasks, evaluation)
    loop = TaskRunner("loop").predictions(ALGORITHMS[name](copy.deepcopy(model), zero_head=True), tasks, evaluation)
    for got, expected in zip(vmapped, loop, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)


def test_a_stacked_meta_batch_of_several_ways_gets_each_tasks_own_predictions() -> None:
    """Tasks of one shape but not one number of ways stack; a zero head's vmap gives each its own ways' outputs."""
    generator = torch.Generator().manual_seed(5)
    labels = [torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])]  # 4 ways and 2, 6 shots each
    tasks = Episodes.of([Task(torch.randn(6, 1, 16, 16, generator=generator, dtype=torch.double), y,
                              torch.randn(6, 1, 16, 16, generator=generator, dtype=torch.double), y) for y in labels])
    assert tasks.stacked
    torch.manual_seed(0)
    model = CNN4(5, 1, image_size=16, hidden_size=8).double()
    loop = meta_step(MAML(copy.deepcopy(model), inner_lr=0.1, zero_head=True), tasks, F.cross_entropy, "loop")
    vmapped = meta_step(MAML(copy.deepcopy(model), inner_lr=0.1, zero_head=True), tasks, F.cross_entropy, "vmap")
    assert [p.shape for p in vmapped[0]] == [(6, 4), (6, 2)]
    torch.testing.assert_close(vmapped[1], loop[1], rtol=1e-5, atol=1e-10)
    for got, expected in zip([*vmapped[0], *vmapped[2]], [*loop[0], *loop[2]], strict=True):
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


@pytest.mark.slow  # ~30 s, most of it rendering kanji
def test_a_meta_dataset_run_trains_and_evaluates_under_vmap(job, kanji_cache) -> None:
    """fo-MAML with a zero head on kanji's Meta-Dataset episodes (5-10 ways, ragged shots), vmap throughout: the
    learner's whole path (training steps, running statistics, validation and test metrics) on padded batches."""
    metrics = train(job(*META_DATASET_KANJI, f"task.cache_dir={kanji_cache}", "algorithm=fomaml",
                        "algorithm.zero_head=true", "runner.backend=vmap", "trainer.max_steps=4", "task.test_tasks=10"))
    assert 0 < metrics["meta_test/post_acc"] <= 1 and metrics["meta_test/post_loss"] > 0, metrics
