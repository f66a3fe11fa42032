"""Batch-norm running statistics: one update per meta-iteration from the first task whatever the backend,
none from adaptation or evaluation, and evaluation that normalises as ``algorithm.eval_batch_norm`` says."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import ANIL, MAML, Context, MetaAlgorithm, ProtoNet, Reptile
from metalab.algorithms.base import joined_inputs
from metalab.learner import MetaLearner, batch_norms
from metalab.models import CNN4
from metalab.runner import TaskRunner
from tests.test_backends import image_tasks


def network() -> CNN4:
    torch.manual_seed(0)
    return CNN4(3, channels=1, image_size=16, hidden_size=8).double()


ALGORITHMS = {
    "maml": lambda model: MAML(model, inner_lr=0.1, inner_steps=2),
    "anil": lambda model: ANIL(model, inner_lr=0.1, inner_steps=2),
    "reptile": lambda model: Reptile(model, inner_lr=0.1, inner_steps=2),
    "protonet": lambda model: ProtoNet(model),
}
CASES = [(name, backend) for name in ALGORITHMS for backend in ("loop", "threads", "vmap")
         if backend != "vmap" or name in ("maml", "anil")]


def learner_for(algorithm: MetaAlgorithm, backend: str = "loop") -> MetaLearner:
    learner = MetaLearner(algorithm, optimizer=torch.optim.Adam, problem="classification", runner=TaskRunner(backend))
    learner.log = lambda *args, **kwargs: None
    return learner


def statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_a_training_step_moves_the_statistics_once_from_the_first_task_whatever_the_backend(name: str,
                                                                                             backend: str) -> None:
    tasks = image_tasks()
    reference = network()  # by hand: nn.BatchNorm's own update, once, from task 0's support and query together
    with torch.no_grad():
        (reference.features if name == "protonet" else reference)(joined_inputs(tasks[0]))
    expected = statistics(reference)
    assert int(expected["features.0.normalize.num_batches_tracked"]) == 1

    algorithm = ALGORITHMS[name](network())
    learner_for(algorithm, backend).training_step(tasks, 0)
    got = statistics(algorithm.model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=f"{name}/{backend}: {key}")


@pytest.mark.parametrize("mode", ["transductive", "running"])
def test_evaluation_writes_no_statistics_and_restores_the_modules_modes(mode: str) -> None:
    tasks = image_tasks()
    algorithm = MAML(network(), inner_lr=0.1, inner_steps=2)
    algorithm.eval_batch_norm = mode
    learner = learner_for(algorithm)
    learner.training_step(tasks, 0)
    before = statistics(algorithm)
    learner.validation_step(tasks, 0)
    learner.test_step(tasks, 0)
    assert all(torch.equal(value, before[key]) for key, value in statistics(algorithm).items())
    assert all(norm.training and norm.track_running_stats for norm in batch_norms(algorithm))


def query_logits_with_other_queries_scaled(algorithm: ProtoNet, task, learner: MetaLearner) -> tuple[torch.Tensor, ...]:
    """The first query's logits, alone with its episode and with every other query's image × 50."""
    scaled = task.query_x.clone()
    scaled[1:] *= 50
    context = Context(F.cross_entropy, training=False)
    with learner._evaluation_batch_norm(), torch.no_grad():
        predictor = algorithm.adapt(task, context)
        return predictor(task.query_x)[0], predictor(scaled)[0]


def test_running_mode_embeds_each_image_on_its_own_and_transductive_mode_does_not() -> None:
    tasks = image_tasks()
    running = ProtoNet(network(), eval_batch_norm="running")
    learner = learner_for(running)
    learner.training_step(tasks, 0)  # statistics other than the initial 0 / 1
    alone, among_scaled = query_logits_with_other_queries_scaled(running, tasks[1], learner)
    torch.testing.assert_close(alone, among_scaled)
    eval_copy = copy.deepcopy(running.network).eval()  # and it is model.eval()'s embedding
    with torch.no_grad():
        embedded = eval_copy.features(joined_inputs(tasks[1])).flatten(1)
    prototypes = torch.stack([embedded[:6][tasks[1].support_y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(alone, -torch.cdist(embedded[6:7], prototypes).pow(2)[0])

    transductive = ProtoNet(copy.deepcopy(running.network))
    alone, among_scaled = query_logits_with_other_queries_scaled(transductive, tasks[1], learner_for(transductive))
    assert not torch.allclose(alone, among_scaled)  # batch statistics mix the episode's images


def test_vmap_normalises_with_the_running_statistics_in_running_mode() -> None:
    tasks = image_tasks()
    algorithm = MAML(network(), inner_lr=0.1, inner_steps=2)
    learner = learner_for(algorithm)
    learner.training_step(tasks, 0)
    context = Context(F.cross_entropy, training=False)
    predictions = {}
    for mode in ("running", "transductive"):
        algorithm.eval_batch_norm = mode
        with learner._evaluation_batch_norm(), torch.enable_grad():
            predictions[mode] = TaskRunner("loop").predictions(algorithm, tasks, context)
            vectorised = TaskRunner("vmap").predictions(algorithm, tasks, context)
        torch.testing.assert_close(vectorised, predictions[mode], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(predictions["running"], predictions["transductive"])
