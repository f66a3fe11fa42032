"""The vectorised (``backend=vmap``) and threaded (``backend=threads``) inner loops compute the same
meta-gradient as learn2learn's loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from metalab.algorithms import ANIL, MAML, MetaSGD
from metalab.learner import MetaLearner
from metalab.models import CNN4, MLP
from metalab.tasks import Episodes
from metalab.train import train
from tests.test_meta_gradient import double_tasks

ALGORITHMS = {
    "maml": lambda model, backend: MAML(model, inner_lr=0.05, inner_steps=2, backend=backend),
    "fomaml": lambda model, backend: MAML(model, inner_lr=0.05, inner_steps=2, first_order=True, backend=backend),
    "metasgd": lambda model, backend: MetaSGD(model, inner_lr=0.05, inner_steps=2, backend=backend),
    "anil": lambda model, backend: ANIL(model, inner_lr=0.1, inner_steps=2, backend=backend),
}


def image_tasks(count: int = 4, ways: int = 3, shots: int = 2, queries: int = 3) -> Episodes:
    generator = torch.Generator().manual_seed(0)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(count, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(count, -1)
    return Episodes(torch.randn(count, ways * shots, 1, 16, 16, generator=generator, dtype=torch.double), support_y,
                    torch.randn(count, ways * queries, 1, 16, 16, generator=generator, dtype=torch.double), query_y)


def meta_gradient(algorithm, tasks: Episodes, problem: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    learner = MetaLearner(algorithm, optimizer=torch.optim.Adam, problem=problem)
    learner.log = lambda *args, **kwargs: None
    loss = learner.training_step(tasks, 0)
    loss.backward()
    return [p.grad.clone() for p in algorithm.parameters()], loss.detach()


@pytest.mark.parametrize("backend", ["vmap", "threads"])
@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("network", ["mlp", "cnn_with_batchnorm"])
def test_backends_give_the_loops_meta_gradient(name: str, network: str, backend: str) -> None:
    torch.manual_seed(0)
    if network == "mlp":
        model, tasks, problem = MLP(1, (32, 32), 1).double(), double_tasks(6), "regression"
    else:
        model, tasks, problem = CNN4(3, 1, image_size=16, hidden_size=8).double(), image_tasks(), "classification"
    loop_gradient, loop_loss = meta_gradient(ALGORITHMS[name](copy.deepcopy(model), "loop"), tasks, problem)
    gradient, loss = meta_gradient(ALGORITHMS[name](copy.deepcopy(model), backend), tasks, problem)
    torch.testing.assert_close(loss, loop_loss, rtol=1e-5, atol=1e-10)
    assert len(gradient) == len(loop_gradient)
    for got, expected in zip(gradient, loop_gradient, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in gradient)


def test_batchnorm_statistics_stay_per_task() -> None:
    """Scaling one task's images must not change another task's predictions (no shared batch statistics)."""
    torch.manual_seed(0)
    algorithm = MAML(CNN4(3, channels=1, image_size=16, hidden_size=8).double(), inner_lr=0.1, backend="vmap")
    tasks = image_tasks(count=2)
    before = algorithm.query_predictions(tasks, F.cross_entropy, training=True)[0]
    scale = torch.tensor([1.0, 50.0], dtype=torch.double).view(2, 1, 1, 1, 1)
    scaled = Episodes(tasks.support_x * scale, tasks.support_y, tasks.query_x * scale, tasks.query_y)
    after = algorithm.query_predictions(scaled, F.cross_entropy, training=True)[0]
    torch.testing.assert_close(before, after)


def test_threads_backend_restores_intra_op_threads_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model, tasks = MLP(1, (32, 32), 1).double(), double_tasks(6)
    threads = torch.get_num_threads()
    first, _ = meta_gradient(MAML(copy.deepcopy(model), inner_lr=0.05, backend="threads"), tasks, "regression")
    second, _ = meta_gradient(MAML(copy.deepcopy(model), inner_lr=0.05, backend="threads"), tasks, "regression")
    assert torch.get_num_threads() == threads
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # summed in task order, whichever worker finished first


def test_auto_backend_is_timed_and_recorded_on_the_run(job, tmp_path) -> None:
    train(job("experiment=smoke", "algorithm.backend=auto"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.data.tags["metalab.backend"] in ("loop", "vmap", "threads")
    probe = run.data.tags["metalab.backend_probe"]
    assert "loop" in probe and "vmap" in probe
    assert ("threads" in probe) == (torch.get_num_threads() > 1)  # threads are tried only with threads to use
