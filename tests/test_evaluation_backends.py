"""Evaluation (validation and test) under every backend records the loop's metrics; its batched pre-adaptation
predictions and per-task records match a task-by-task reference; and it leaves no graph to the meta-parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import ANIL, MAML, Context, MetaAlgorithm, ProtoNet
from metalab.learner import MetaLearner
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner
from metalab.stats import mean_and_ci95
from metalab.tasks import Episodes
from tests.test_backends import image_tasks
from tests.test_meta_gradient import double_tasks

ALGORITHMS = {  # second order in training, as the defaults: evaluation must still be first order
    "maml": lambda model: MAML(model, inner_lr=0.1, inner_steps=2),
    "anil": lambda model: ANIL(model, inner_lr=0.1, inner_steps=2),
    "protonet": ProtoNet,  # no vectorised_adapt: threads against the loop
}


def family(name: str, eval_batch_norm: str | None) -> tuple[torch.nn.Module, Episodes, str]:
    """A network (batch norm's running statistics moved off 0 / 1 by one training-mode forward), tasks, problem."""
    torch.manual_seed(0)
    if name == "sinusoid":
        return MLP(1, (32, 32), 1).double(), double_tasks(6), "regression"
    model, tasks = CNN4(3, channels=1, image_size=16, hidden_size=8).double(), image_tasks(count=6)
    with torch.no_grad():
        model(tasks.support_x.flatten(0, 1) * 2 + 1)
    return model, tasks, "classification"


def cases() -> list[tuple[str, str, str | None, str]]:
    """(algorithm, family, eval_batch_norm, backend): every backend each algorithm runs besides the loop."""
    found = [("maml", "sinusoid", None, backend) for backend in ("threads", "vmap")]
    for mode in ("transductive", "running"):
        found += [(name, "images", mode, backend) for name in ("maml", "anil") for backend in ("threads", "vmap")]
        found.append(("protonet", "images", mode, "threads"))
    return found


def case_id(case: tuple[str, str, str | None, str]) -> str:
    name, family_name, mode, backend = case
    return "-".join(part for part in (name, family_name, mode, backend) if part)


def learner_for(algorithm: MetaAlgorithm, problem: str, backend: str) -> tuple[MetaLearner, dict[str, float]]:
    """A learner whose ``log`` writes into the returned dict."""
    learner = MetaLearner(algorithm, optimizer=torch.optim.Adam, problem=problem, runner=TaskRunner(backend))
    logged: dict[str, float] = {}
    learner.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    return learner, logged


def evaluate(name: str, model: torch.nn.Module, tasks: Episodes, problem: str, mode: str | None,
             backend: str) -> dict[str, float]:
    """``meta_val/*`` and ``meta_test/*`` as the learner logs them, over two evaluation batches of ``tasks``."""
    algorithm = ALGORITHMS[name](copy.deepcopy(model))
    if mode is not None:
        algorithm.eval_batch_norm = mode
    learner, logged = learner_for(algorithm, problem, backend)
    halves = [tasks[: len(tasks) // 2], tasks[len(tasks) // 2:]]
    with torch.no_grad():  # as Lightning evaluates
        for index, batch in enumerate(halves):
            learner.validation_step(batch, index)
        learner.on_validation_epoch_end()
        for index, batch in enumerate(halves):
            learner.test_step(batch, index)
        learner.on_test_epoch_end()
    assert all(p.grad is None for p in algorithm.parameters())
    return logged


@pytest.mark.parametrize(("name", "family_name", "mode", "backend"), cases(), ids=map(case_id, cases()))
def test_evaluation_with_each_backend_logs_the_loops_metrics(name: str, family_name: str, mode: str | None,
                                                              backend: str) -> None:
    model, tasks, problem = family(family_name, mode)
    expected = evaluate(name, model, tasks, problem, mode, "loop")
    got = evaluate(name, model, tasks, problem, mode, backend)
    prefixes = ("post",) if name == "protonet" else ("pre", "post")
    metrics = ("loss", "acc") if problem == "classification" else ("loss",)
    names = {f"{stage}/{when}_{metric}{ci}" for stage in ("meta_val", "meta_test") for when in prefixes
             for metric in metrics for ci in ("", "_ci95")}
    assert set(expected) == names
    assert set(got) == names
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("mode", ["transductive", "running"])
def test_batched_evaluation_records_what_task_by_task_evaluation_does(mode: str) -> None:
    """The learner's pre (one vmap over the tasks) and post records, against each task's own forward and loss."""
    model, tasks, _ = family("images", mode)
    logged = evaluate("maml", model, tasks, "classification", mode, "loop")
    algorithm = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=2)
    algorithm.eval_batch_norm = mode
    learner, _ = learner_for(algorithm, "classification", "loop")
    context = Context(F.cross_entropy, training=False)
    per_task: dict[str, list[torch.Tensor]] = {"pre_loss": [], "pre_acc": [], "post_loss": [], "post_acc": []}
    with learner._evaluation_batch_norm():
        for task in tasks:
            with torch.no_grad():
                before = algorithm.model(task.query_x)
            after = algorithm.adapt(task, context)(task.query_x).detach()
            for when, logits in (("pre", before), ("post", after)):
                per_task[f"{when}_loss"].append(F.cross_entropy(logits, task.query_y))
                per_task[f"{when}_acc"].append((logits.argmax(-1) == task.query_y).double().mean())
    for key, values in per_task.items():
        mean, ci95 = mean_and_ci95(torch.stack(values))
        assert logged[f"meta_val/{key}"] == pytest.approx(mean, rel=1e-6), key  # accuracies in float32
        assert logged[f"meta_val/{key}_ci95"] == pytest.approx(ci95, rel=1e-6), key


@pytest.mark.parametrize("backend", ["loop", "threads", "vmap"])
def test_evaluation_predictions_keep_no_graph_even_when_told_training(backend: str) -> None:
    """Second-order MAML: whatever context reaches ``predictions``, no graph back to the meta-parameters."""
    model, tasks, _ = family("images", "transductive")
    algorithm = MAML(model, inner_lr=0.1, inner_steps=2)
    runner = TaskRunner(backend)
    for training in (False, True):
        context = Context(F.cross_entropy, training=training)
        predictions = runner.predictions(algorithm, tasks, context)
        assert predictions.grad_fn is None and not predictions.requires_grad
        before = runner.unadapted_predictions(algorithm, tasks, context)
        assert before.shape == predictions.shape and not before.requires_grad
