"""MAML++: with every component off it is MAML; each component against a hand computation or a reference;
short real runs that learn and record the learned rates."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from metalab.algorithms import MAML, Context, MAMLPlusPlus
from metalab.algorithms.maml_pp import multi_step_loss_weights
from metalab.errors import ConfigError
from metalab.job import train
from metalab.learner import MetaLearner
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner
from metalab.tasks import Episodes
from tests.test_algorithms import KANJI, saved_parameters
from tests.test_backends import image_tasks
from tests.test_meta_gradient import double_tasks
from tests.test_training import SHORT

# Every component off: fixed shared rate, shared (adapted) batch-norm weights and statistics, last-step loss,
# second order from the first meta-iteration.
OFF = {"per_step_lr": False, "per_step_bn_weights": False, "per_step_bn_statistics": False,
       "multi_step_loss": False, "first_order_epochs": 0}


def networks() -> list[tuple[str, torch.nn.Module, Episodes, str]]:
    torch.manual_seed(0)
    return [("mlp", MLP(1, (32, 32), 1).double(), double_tasks(6), "regression"),
            ("cnn4_batchnorm", CNN4(3, 1, image_size=16, hidden_size=8).double(), image_tasks(), "classification")]


NETWORKS = networks()


def model_gradient(algorithm, model: torch.nn.Module, tasks: Episodes, problem: str,
                   step: int = 0) -> list[torch.Tensor]:
    """The mean meta-gradient of ``model``'s parameters over ``tasks`` at meta-iteration ``step`` (the loop)."""
    loss_fn = F.mse_loss if problem == "regression" else F.cross_entropy
    _, loss = TaskRunner("loop").meta_loss(algorithm, tasks, Context(loss_fn, training=True, step=step))
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for ours, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize(("name", "model", "tasks", "problem"), NETWORKS, ids=[n[0] for n in NETWORKS])
def test_every_component_off_is_maml(name, model, tasks, problem) -> None:
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    got = model_gradient(MAMLPlusPlus(ours, inner_lr=0.05, inner_steps=2, **OFF), ours, tasks, problem)
    expected = model_gradient(MAML(reference, inner_lr=0.05, inner_steps=2), reference, tasks, problem)
    assert_same(got, expected)


@pytest.mark.parametrize(("name", "model", "tasks", "problem"), NETWORKS, ids=[n[0] for n in NETWORKS])
def test_derivative_order_annealing_switches_from_first_to_second_order(name, model, tasks, problem) -> None:
    """First order before epoch ``first_order_epochs`` (10 meta-iterations here), second order from it on."""
    settings = OFF | {"first_order_epochs": 1, "steps_per_epoch": 10}
    gradients = {}
    for step in (9, 10):
        ours = copy.deepcopy(model)
        gradients[step] = model_gradient(MAMLPlusPlus(ours, inner_lr=0.05, inner_steps=2, **settings), ours, tasks,
                                         problem, step=step)
    for step, first_order in ((9, True), (10, False)):
        reference = copy.deepcopy(model)
        expected = model_gradient(MAML(reference, inner_lr=0.05, inner_steps=2, first_order=first_order), reference,
                                  tasks, problem)
        assert_same(gradients[step], expected)
    assert any((a - b).abs().max() > 1e-6 * b.abs().max() for a, b in zip(gradients[9], gradients[10], strict=True))


def test_multi_step_loss_weights_follow_the_authors_schedule() -> None:
    """N = 5 steps annealed over 15 epochs: each earlier step loses 1/75 per epoch, the last gains 4/75."""
    assert multi_step_loss_weights(5, 0, 15) == pytest.approx([0.2] * 5)
    assert multi_step_loss_weights(5, 5, 15) == pytest.approx([0.2 - 5 / 75] * 4 + [0.2 + 20 / 75])
    assert multi_step_loss_weights(5, 14, 15) == pytest.approx([1 / 75] * 4 + [0.2 + 56 / 75])
    assert multi_step_loss_weights(5, 15, 15) == [0.0, 0.0, 0.0, 0.0, 1.0]  # annealing over: the last step alone
    # the floor: 0.03/N for earlier steps, 1 − (N − 1)·0.03/N for the last (over 40 epochs, epoch 39)
    assert multi_step_loss_weights(5, 39, 40) == pytest.approx([0.006] * 4 + [0.976])
    assert multi_step_loss_weights(1, 3, 15) == pytest.approx([1.0])
    algorithm = MAMLPlusPlus(MLP(1, (4,), 1), inner_steps=5, multi_step_loss_epochs=15, steps_per_epoch=500)
    assert algorithm.loss_weights(2499) == pytest.approx([0.2 - 4 / 75] * 4 + [0.2 + 16 / 75])  # whole epochs: 4
    assert algorithm.loss_weights(2500) == pytest.approx([0.2 - 5 / 75] * 4 + [0.2 + 20 / 75])
    assert MAMLPlusPlus(MLP(1, (4,), 1), inner_steps=3, multi_step_loss=False).loss_weights(0) == [0.0, 0.0, 1.0]


def test_the_meta_objective_is_the_weighted_sum_of_the_steps_query_losses() -> None:
    torch.manual_seed(0)
    algorithm = MAMLPlusPlus(MLP(1, (16,), 1).double(), inner_lr=0.05, inner_steps=3, multi_step_loss_epochs=4,
                             steps_per_epoch=10, per_step_bn_weights=False, per_step_bn_statistics=False)
    task = double_tasks(1)[0]
    step = 25  # epoch 2 of 4: weights (1/3 − 2/12, 1/3 − 2/12, 1/3 + 4/12)
    _, loss = algorithm.query_loss(task, Context(F.mse_loss, training=True, step=step))
    weights = algorithm.loss_weights(step)
    assert weights == pytest.approx([1 / 6, 1 / 6, 2 / 3])
    after = [F.mse_loss(algorithm.adapt(task, Context(F.mse_loss, training=True, inner_steps=k))(task.query_x),
                        task.query_y) for k in (1, 2, 3)]
    torch.testing.assert_close(loss, sum(w * q for w, q in zip(weights, after, strict=True)))
    assert len({round(q.item(), 9) for q in after}) == 3  # the steps' losses differ: the weights matter


def test_each_inner_step_normalises_with_its_own_batchnorm_weights() -> None:
    torch.manual_seed(0)
    algorithm = MAMLPlusPlus(CNN4(3, 1, image_size=16, hidden_size=8).double(), inner_lr=0.1, inner_steps=2)
    tasks, context = image_tasks(count=2), Context(F.cross_entropy, training=True)
    _, loss = TaskRunner("loop").meta_loss(algorithm, tasks, context)
    loss.backward()
    step0 = algorithm.network.features[0].normalize.bias  # step 0: the network's own
    step1 = algorithm.bn_weights["features-0-normalize-bias"]  # (1, C): step 1's copy
    assert step1.shape == (1, 8)
    assert step0.grad.abs().sum() > 0 and step1.grad.abs().sum() > 0
    assert not torch.allclose(step0.grad, step1.grad[0])  # two parameters, two gradients

    task, evaluation = tasks[0], context.evaluating()
    before, adapted = algorithm.model(task.query_x), algorithm.adapt(task, evaluation)(task.query_x)
    with torch.no_grad():
        step1.add_(0.5)  # changes the last step's normalisation only
    assert torch.equal(algorithm.model(task.query_x), before)  # the unadapted network (step 0) is untouched
    assert not torch.allclose(algorithm.adapt(task, evaluation)(task.query_x), adapted)


def test_per_step_statistics_are_updated_in_training_and_left_alone_by_evaluation() -> None:
    torch.manual_seed(0)
    algorithm = MAMLPlusPlus(CNN4(3, 1, image_size=16, hidden_size=8).double(), inner_lr=0.1, inner_steps=2)
    statistics = algorithm.bn_statistics.get_buffer("features-1-normalize-running_mean")  # (steps, C)
    assert torch.equal(statistics, torch.zeros(2, 8, dtype=torch.double))
    tasks = image_tasks(count=2)
    learner = MetaLearner(algorithm, optimizer=torch.optim.Adam, problem="classification", runner=TaskRunner("loop"))
    learner.log = lambda *args, **kwargs: None
    learner.training_step(tasks, 0)  # a real step: the runner's adaptations leave statistics alone, then BNRS
    trained = statistics.clone()
    assert (trained[0] != 0).all() and (trained[1] != 0).all() and not torch.allclose(trained[0], trained[1])
    algorithm.adapt(tasks[1], Context(F.cross_entropy, training=False))(tasks[1].query_x)
    assert torch.equal(statistics, trained)
    own = algorithm.network.features[1].normalize.running_mean
    assert torch.equal(own, torch.zeros(8, dtype=torch.double))  # BNRS keeps the layer's own statistics out of it


def test_learned_rates_get_a_meta_gradient_per_step_and_feed_the_report() -> None:
    torch.manual_seed(0)
    algorithm = MAMLPlusPlus(MLP(1, (16,), 1).double(), inner_lr=0.05, inner_steps=3, first_order_epochs=0)
    _, loss = TaskRunner("loop").meta_loss(algorithm, double_tasks(4), Context(F.mse_loss, training=True))
    loss.backward()
    assert set(algorithm.rates) == {"features-0-weight", "features-0-bias", "head-weight", "head-bias"}
    for rate in algorithm.rates.values():
        assert rate.shape == (3,) and (rate.grad != 0).all()
    report = algorithm.fit_report()
    assert report.metrics["maml_pp/lr_mean"] == pytest.approx(0.05)
    assert report.metrics["maml_pp/lr_mean_step3"] == pytest.approx(0.05)  # steps count from 1
    assert set(report.figures) == {"maml_pp_lrs.png"}
    assert MAMLPlusPlus(MLP(1, (4,), 1), per_step_lr=False).fit_report() is None


@pytest.mark.parametrize(("settings", "message"), [
    ({"multi_step_loss_epochs": 0}, "multi_step_loss_epochs must be >= 1 with multi_step_loss=true"),
    ({"first_order_epochs": -1}, "first_order_epochs must be >= 0"),
    ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1"),
])
def test_bad_schedules_are_refused_naming_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MAMLPlusPlus(MLP(1, (4,), 1), **settings)


def test_maml_pp_learns_sinusoids_and_records_its_rates(job, tmp_path) -> None:
    """200 meta-iterations of 50-iteration epochs: first order in epoch 0, MSL annealed over epochs 0-1."""
    metrics = train(job("algorithm=maml_pp", *SHORT, "trainer.max_steps=200", "trainer.val_check_interval=1000",
                        "optimizer.lr=0.003", "algorithm.inner_lr=0.05", "algorithm.inner_steps=2",
                        "algorithm.steps_per_epoch=50", "algorithm.multi_step_loss_epochs=2",
                        "algorithm.first_order_epochs=1"))
    # post/pre was 0.34 (seed 0; 0.34 and 0.44 with seeds 1 and 2)
    assert metrics["meta_test/post_loss"] < 0.5 * metrics["meta_test/pre_loss"], metrics
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    logged = run.data.metrics
    rates = saved_parameters(tmp_path / "run0", ".rates.")  # the learned rates, from the run's last checkpoint
    assert rates.numel() == 6 * 2  # one per parameter tensor of MLP(1, (40, 40), 1) and inner step
    for name, value in {"mean": rates.mean(), "min": rates.min(), "max": rates.max()}.items():
        assert logged[f"maml_pp/lr_{name}"] == pytest.approx(value.item(), rel=1e-5), name
    assert logged["maml_pp/lr_std"] > 0  # the rates moved apart from their common start
    assert {"maml_pp/lr_mean_step1", "maml_pp/lr_mean_step2"} <= set(logged)  # one per inner step
    assert "maml_pp_lrs.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow  # ~30 s; `make test` keeps MAML++ learning sinusoids
def test_maml_pp_learns_kanji_well_above_chance(job, kanji_cache) -> None:
    metrics = train(job("tracking=none", "algorithm=maml_pp", *KANJI, f"task.cache_dir={kanji_cache}",
                        "trainer.max_steps=80", "algorithm.inner_lr=0.4", "algorithm.inner_steps=2",
                        "algorithm.steps_per_epoch=20", "algorithm.multi_step_loss_epochs=2",
                        "algorithm.first_order_epochs=1"))
    assert metrics["meta_test/post_acc"] > 0.5, metrics  # chance is 0.2; 0.73 with seed 0 (0.77 with seed 1)


def test_tasks_adapted_at_once_on_threads_do_not_share_modules() -> None:
    """``functional_call`` swaps a module's tensors while it runs: worker threads on one module object would
    mix tasks' weights (seen as "backward through the graph a second time"). 16 tasks give the race room."""
    torch.manual_seed(0)
    model, tasks = MLP(1, (32, 32), 1).double(), double_tasks(16)
    gradients = {}
    for backend in ("loop", "threads"):
        algorithm = MAMLPlusPlus(copy.deepcopy(model), inner_lr=0.05, inner_steps=3, first_order_epochs=0)
        _, loss = TaskRunner(backend).meta_loss(algorithm, tasks, Context(F.mse_loss, training=True))
        loss.backward()
        gradients[backend] = [p.grad for p in algorithm.parameters()]
    assert_same(gradients["threads"], gradients["loop"])
