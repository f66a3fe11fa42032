"""``algorithm.inner_checkpointing``: the meta-gradient of every second-order MAML-family option is unchanged
under the ``loop`` and ``threads`` backends, the graph's saved tensors stop growing with ``inner_steps``, the key
reaches the algorithm through Hydra, and combinations it cannot serve are refused with one line."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from benchmarks.imaml_memory import GraphMemory
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from torch import nn

from metalab.algorithms import MAML, Context, MetaAlgorithm
from metalab.config import config_dir
from metalab.errors import ConfigError, one_line
from metalab.job import build
from metalab.learner import running_statistics_untouched
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner
from metalab.tasks import Episodes
from metalab.tasks.episodes import Task
from tests.test_backends import image_tasks, meta_gradient, run_steps
from tests.test_meta_gradient import double_tasks


def second_order_options() -> list[str]:
    """Every option of conf/algorithm/ that offers the key and is second order as configured."""
    options = []
    for path in sorted((config_dir() / "algorithm").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if "inner_checkpointing" in spec and not spec.get("first_order", False):
            options.append(path.stem)
    return options


OPTIONS = second_order_options()


def build_algorithm(job, option: str, model: nn.Module, inner_steps: int, checkpointing: bool) -> MetaAlgorithm:
    cfg = job(f"algorithm={option}", "tracking=none")
    # MAML++: second order from the first meta-iteration (DA's first-order epochs would checkpoint nothing)
    settings = {"inner_steps": inner_steps, "first_order_epochs": 0, "inner_checkpointing": checkpointing}
    return instantiate(cfg.algorithm, model=model, **{k: v for k, v in settings.items() if k in cfg.algorithm})


def network_and_tasks(network: str) -> tuple[nn.Module, Episodes, str]:
    torch.manual_seed(0)
    if network == "mlp":
        return MLP(1, (32, 32), 1).double(), double_tasks(4), "regression"
    return CNN4(3, 1, image_size=16, hidden_size=8).double(), image_tasks(count=3), "classification"


def module_calls(model: nn.Module) -> list[int]:
    """A counter of forward calls of ``model``'s modules (task-local copies share the hooks)."""
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    for module in model.modules():
        module.register_forward_hook(count)
    return calls


def test_the_options_that_offer_checkpointing() -> None:
    """Pins which options are tested here, so a lost key is noticed (fomaml has the key, refused when true)."""
    assert OPTIONS == ["anil", "maml", "maml_pp", "metasgd"]


@pytest.mark.parametrize("backend", ["loop", "threads"])
@pytest.mark.parametrize("inner_steps", [pytest.param(1, marks=pytest.mark.slow), 5])  # 5 steps: the default suite
@pytest.mark.parametrize("network", ["mlp", "cnn4_batchnorm"])
@pytest.mark.parametrize("option", OPTIONS)
def test_checkpointed_meta_gradient_equals_the_plain_one(job, option: str, network: str, inner_steps: int,
                                                          backend: str) -> None:
    """With checkpointing under ``backend``, the meta-gradient of the loop without it (rel 1e-5), and the inner
    loop really ran recomputed (more forward calls)."""
    model, tasks, problem = network_and_tasks(network)
    plain = build_algorithm(job, option, copy.deepcopy(model), inner_steps, checkpointing=False)
    if problem not in plain.problems:
        pytest.skip(f"{option} does not learn {problem} tasks")
    checkpointed = build_algorithm(job, option, copy.deepcopy(model), inner_steps, checkpointing=True)
    plain_calls, checkpointed_calls = module_calls(plain.model), module_calls(checkpointed.model)
    expected, expected_loss = meta_gradient(plain, tasks, problem, "loop")
    got, loss = meta_gradient(checkpointed, tasks, problem, backend)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-10)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in got)
    assert checkpointed_calls[0] > plain_calls[0]


def saved_bytes(inner_steps: int, checkpointing: bool) -> int:
    """Peak bytes autograd holds for one CNN4 (batch norm) 5-way 1-shot task's second-order MAML meta-gradient."""
    torch.manual_seed(0)
    algorithm = MAML(CNN4(5, 1, image_size=28, hidden_size=32), inner_lr=0.4, inner_steps=inner_steps,
                     inner_checkpointing=checkpointing)
    labels = torch.arange(5)
    task = Task(torch.rand(5, 1, 28, 28), labels, torch.rand(10, 1, 28, 28), labels.repeat(2))
    meter = GraphMemory()
    with running_statistics_untouched(algorithm), meter.measuring():
        algorithm.task_meta_gradient(task, Context(F.cross_entropy, training=True))
    return meter.peak


def test_checkpointing_keeps_the_graph_flat_in_inner_steps() -> None:
    """Without checkpointing the graph holds every inner step's activations (seen: 6.7 MB at 1 step, +3.1 MB a
    step); with it, the query forward's and each step's input weights only (3.7 MB, +0.11 MB a step: CNN4-32's
    weights)."""
    plain = {steps: saved_bytes(steps, checkpointing=False) for steps in (1, 5)}
    checkpointed = {steps: saved_bytes(steps, checkpointing=True) for steps in (1, 5)}
    assert plain[5] > 2.5 * plain[1]
    assert checkpointed[5] < 1.25 * checkpointed[1]
    assert checkpointed[5] - checkpointed[1] < (plain[5] - plain[1]) / 10


def test_inner_checkpointing_reaches_the_algorithm_through_hydra(job) -> None:
    """``algorithm.inner_checkpointing=true`` on the command line builds a checkpointing MAML that trains."""
    cfg = job("algorithm=maml", "algorithm.inner_checkpointing=true", "algorithm.inner_steps=3",
              "runner.backend=loop", "tracking=none")
    task, learner = build(cfg, seed=0)
    assert learner.algorithm.inner_checkpointing is True and learner.algorithm.inner_steps == 3
    learner.log = lambda *args, **kwargs: None
    learner.training_step(task.sample(2, torch.Generator().manual_seed(0), "train"), 0).backward()
    assert all(p.grad is not None for p in learner.algorithm.meta_parameters())
    assert job("algorithm=maml", "tracking=none").algorithm.inner_checkpointing is False


FIRST_ORDER_REFUSED = (r"algorithm.inner_checkpointing=true needs second-order meta-gradients, and "
                       r"algorithm.first_order=true keeps no inner-loop graph to checkpoint: set either false")
VMAP_REFUSED = (r"runner.backend=vmap cannot run with algorithm.inner_checkpointing=true \(.*\): "
                r"use runner.backend=loop, threads or auto, or set algorithm.inner_checkpointing=false")


def test_first_order_with_checkpointing_is_refused_in_one_line(job) -> None:
    with pytest.raises(ConfigError, match=f"^{FIRST_ORDER_REFUSED}$"):
        MAML(MLP(1, (8,), 1), first_order=True, inner_checkpointing=True)
    cfg = job("algorithm=fomaml", "algorithm.inner_checkpointing=true", "tracking=none")
    with pytest.raises(InstantiationException) as error:  # how the command line meets it: its one line
        build(cfg, seed=0)
    assert isinstance(error.value.__cause__, ConfigError)
    assert re.fullmatch(FIRST_ORDER_REFUSED, one_line(error.value))


@pytest.mark.parametrize("option", ["imaml", "reptile", "protonet"])
def test_algorithms_without_a_second_order_inner_loop_do_not_offer_the_key(job, option: str) -> None:
    with pytest.raises(ConfigCompositionException):
        job(f"algorithm={option}", "algorithm.inner_checkpointing=true", "tracking=none")


def test_vmap_with_checkpointing_is_refused_and_auto_drops_it(job) -> None:
    algorithm = MAML(MLP(1, (8,), 1).double(), inner_lr=0.05, inner_steps=2, inner_checkpointing=True)
    with pytest.raises(ConfigError, match=f"^{VMAP_REFUSED}$"):
        TaskRunner("vmap").check(algorithm)
    cfg = job("algorithm=maml", "algorithm.inner_checkpointing=true", "runner.backend=vmap", "tracking=none")
    with pytest.raises(InstantiationException) as error:
        build(cfg, seed=0)
    assert re.fullmatch(VMAP_REFUSED, one_line(error.value))
    runner = TaskRunner("auto")
    run_steps(runner, algorithm, 6)
    assert runner.chosen in ("loop", "threads")
    assert runner.probe["vmap"].startswith("failed: algorithm.inner_checkpointing=true")
