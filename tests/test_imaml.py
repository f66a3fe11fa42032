"""iMAML: the implicit meta-gradient against the closed form of a proximal least-squares problem, the proximal
inner problem itself, a graph that does not grow with the inner steps, and short real runs that learn."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from benchmarks.imaml_memory import GraphMemory, measure
from mlflow.tracking import MlflowClient

from metalab.algorithms import IMAML, Context
from metalab.errors import ConfigError
from metalab.job import train
from metalab.models import MLP
from metalab.runner import TaskRunner
from metalab.tasks.episodes import Episodes, Task
from tests.test_algorithms import KANJI
from tests.test_meta_gradient import double_tasks
from tests.test_training import SHORT

D, N, Q = 5, 20, 15  # features, support points, query points


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small convolutions on a shared machine: a second intra-op thread mostly waits on the first (seen here: a
    kanji run of 45 s on one thread took minutes on two, beside other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression_task(seed: int = 0) -> Task:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.double)

    return Task(draw(N, D), draw(N, 1), draw(Q, D), draw(Q, 1))


def linear_model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(D, 1, bias=False).double()


def closed_form(task: Task, theta: torch.Tensor, reg_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """φ* = (A + λI)⁻¹(b + λθ) of min ‖Xφ − y‖²/n + (λ/2)‖φ − θ‖², with A = 2XᵀX/n, b = 2Xᵀy/n, and the exact
    meta-gradient dφ*/dθᵀ ∇L_query(φ*) = λ(A + λI)⁻¹ ∇L_query(φ*) (A + λI is symmetric)."""
    x, y = task.support_x, task.support_y
    regularised = 2 * x.T @ x / N + reg_lambda * torch.eye(D, dtype=torch.double)
    phi = torch.linalg.solve(regularised, 2 * x.T @ y / N + reg_lambda * theta)
    query_gradient = 2 * task.query_x.T @ (task.query_x @ phi - task.query_y) / Q
    return phi, reg_lambda * torch.linalg.solve(regularised, query_gradient)


@pytest.mark.parametrize("reg_lambda", [0.5, 2.0])
def test_implicit_meta_gradient_matches_the_closed_form(reg_lambda: float) -> None:
    """Through the runner, as in training: with a converged inner problem, enough CG steps and no damping the
    meta-gradient is exact; with one CG step it is not (so the test pins CG, not just the first-order term); with
    damping δ it solves ((1 + δ)·I + A/λ) v = ∇L_query(φ*) (A is the support loss's Hessian)."""
    task = regression_task()
    tasks = Episodes(*(t.unsqueeze(0) for t in (task.support_x, task.support_y, task.query_x, task.query_y)))

    def meta_gradient(cg_steps: int, cg_damping: float = 0.0) -> torch.Tensor:
        model = linear_model()
        algorithm = IMAML(model, inner_lr=0.1, inner_steps=400, reg_lambda=reg_lambda, cg_steps=cg_steps,
                          cg_damping=cg_damping)
        _, loss = TaskRunner("loop").meta_loss(algorithm, tasks, Context(F.mse_loss, training=True))
        loss.backward()
        return model.weight.grad.reshape(D, 1)

    phi, exact = closed_form(task, linear_model().weight.detach().reshape(D, 1), reg_lambda)
    torch.testing.assert_close(meta_gradient(cg_steps=2 * D), exact, rtol=1e-5, atol=1e-12)
    one_step = meta_gradient(cg_steps=1)
    assert (one_step - exact).norm() > 1e-2 * exact.norm()

    hessian = 2 * task.support_x.T @ task.support_x / N
    query_gradient = 2 * task.query_x.T @ (task.query_x @ phi - task.query_y) / Q
    damped = torch.linalg.solve(2.0 * torch.eye(D, dtype=torch.double) + hessian / reg_lambda, query_gradient)
    torch.testing.assert_close(meta_gradient(cg_steps=2 * D, cg_damping=1.0), damped, rtol=1e-5, atol=1e-12)


def test_inner_problem_is_proximal() -> None:
    """φ* is the regularised least-squares solution, and it moves towards θ as λ grows."""
    task = regression_task()
    model = linear_model()
    theta = model.weight.detach().reshape(D, 1)
    distances = []
    for reg_lambda in (0.1, 1.0, 10.0, 100.0):
        # GD converges for α (λ + largest eigenvalue of A) < 2: A's eigenvalues here are below 5
        algorithm = IMAML(model, inner_lr=1.0 / (reg_lambda + 5.0), inner_steps=3000, reg_lambda=reg_lambda)
        learner = algorithm.solve(task.support_x, task.support_y, F.mse_loss, algorithm.inner_steps)
        phi = learner.weight.detach().reshape(D, 1)
        expected, _ = closed_form(task, theta, reg_lambda)
        torch.testing.assert_close(phi, expected, rtol=1e-8, atol=1e-12)
        distances.append((phi - theta).norm().item())
    assert distances == sorted(distances, reverse=True) and distances[-1] < 0.05 * distances[0], distances
    assert torch.equal(model.weight.detach().reshape(D, 1), theta)  # θ itself is left alone


def test_inner_steps_keep_no_graph() -> None:
    """No autograd graph outlives an inner step: the bytes graphs hold peak at one step's, whatever the number of
    steps, none are left once the inner loop is done, and a task's whole meta-gradient (inner loop, CG) holds as
    much after 20 inner steps as after 1."""
    torch.manual_seed(0)
    task = double_tasks(1)[0]
    solving, meta_gradient = [], []
    for steps in (1, 20):
        algorithm = IMAML(MLP(1, (32, 32), 1).double(), inner_lr=0.01, inner_steps=steps)
        meter = GraphMemory()
        with meter.measuring():
            algorithm.solve(task.support_x, task.support_y, F.mse_loss, steps)
            assert meter.current == 0  # the adapted copy carries no graph back through its inner steps
        solving.append(meter.peak)
        meter = GraphMemory()
        with meter.measuring():
            algorithm.task_meta_gradient(task, Context(F.mse_loss, training=True))
        meta_gradient.append(meter.peak)
    assert solving[0] == solving[1] > 0
    assert meta_gradient[0] == meta_gradient[1] > solving[0]


def test_graph_memory_is_flat_in_inner_steps_for_imaml_and_grows_for_maml(one_thread) -> None:
    """benchmarks/imaml_memory.py's measurement at a tiny size: the bytes autograd graphs hold at their peak. CPU
    resident memory is too coarse at this size (the allocator keeps freed pages), so the graph is measured."""
    tiny = dict(meta_batch=2, ways=3, queries=5, image_size=16, hidden_size=8, repeats=1, resident=False)
    peak = {(name, steps): measure(name, steps, **tiny).graph_bytes for name in ("imaml", "maml") for steps in (1, 20)}
    assert peak["imaml", 20] <= 1.3 * peak["imaml", 1], peak
    assert peak["maml", 20] > 1.5 * peak["maml", 1], peak


@pytest.mark.parametrize(("key", "value"), [("reg_lambda", 0.0), ("cg_steps", 0), ("cg_damping", -1.0),
                                            ("inner_steps", 0), ("inner_lr", -0.1)])
def test_bad_settings_are_refused_naming_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"algorithm.{key} must be"):
        IMAML(linear_model(), **{key: value})


# Regression sharpens the support loss as it meta-trains (see IMAML's docstring): a small inner_lr with
# inner_lr·λ·inner_steps = 1, so the inner problem converges and gradient descent stays stable for the run (the
# largest support-loss curvature grew from ~45 to ~250 by step 300 here; the limit 2/inner_lr − λ is 390; the
# query loss after adaptation starts to degrade after ~500 steps). Post/pre ≈ 0.26 after 300 steps.
SINUSOID = ["trainer.max_steps=300", "task.meta_batch_size=5", "algorithm.inner_steps=20", "algorithm.inner_lr=0.005",
            "algorithm.reg_lambda=10.0", "optimizer.lr=0.003", "task.test_tasks=100", "task.val_tasks=10"]


def test_imaml_learns_sinusoids(job) -> None:
    metrics = train(job("tracking=none", "algorithm=imaml", *SHORT, *SINUSOID, "trainer.val_check_interval=1000",
                        "runner.backend=loop"))
    assert metrics["meta_test/post_loss"] < 0.5 * metrics["meta_test/pre_loss"], metrics


@pytest.mark.slow  # ~55 s on 2 cores: run by `make test-slow` (.ci/run runs it after `make test`)
def test_imaml_learns_kanji_and_mlflow_records_the_run(job, tmp_path, kanji_cache, one_thread) -> None:
    """The paper's λ = 2 and 5 CG steps (damped as the authors' code), 5 inner steps of 0.1 (inner_lr·λ·steps = 1).
    Fine-tuning the untrained network the same way already reaches ~0.56 (batch norm, 5 steps); the meta-trained
    one reached ~0.79: it must beat the untrained one clearly."""
    kanji = [*KANJI, f"task.cache_dir={kanji_cache}", "task.meta_batch_size=4", "runner.backend=loop",
             "algorithm.inner_steps=5"]
    untrained = train(job("tracking=none", "algorithm=imaml", *kanji, "trainer.max_steps=0"))
    metrics = train(job("algorithm=imaml", *kanji, "trainer.max_steps=100"))
    assert metrics["meta_test/post_acc"] > untrained["meta_test/post_acc"] + 0.12, (metrics, untrained)
    assert metrics["meta_test/post_acc"] > 0.65, metrics  # chance is 0.2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("kanji").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["metalab.algorithm"] == "imaml"
    assert run.data.params["algorithm._target_"] == "metalab.algorithms.IMAML"
    assert run.data.params["algorithm.reg_lambda"] == "2.0" and run.data.params["algorithm.cg_steps"] == "5"
    for name in ("post_acc", "post_acc_ci95", "pre_acc", "post_loss", "pre_loss"):
        assert run.data.metrics[f"meta_test/{name}"] == pytest.approx(metrics[f"meta_test/{name}"])
