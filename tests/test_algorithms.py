"""Every algorithm: its maths against learn2learn's reference loop (or a hand computation), and a short
real run that learns."""

from __future__ import annotations

import copy
from pathlib import Path

import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra.utils import get_class
from mlflow.tracking import MlflowClient

from metalab.algorithms import ANIL, Context, MetaSGD, ProtoNet, Reptile
from metalab.algorithms.protonet import PrototypeBased
from metalab.config import config_dir
from metalab.errors import ConfigError
from metalab.job import train
from metalab.learner import MetaLearner
from metalab.models import MLP
from metalab.runner import TaskRunner
from metalab.tasks.episodes import Task
from tests.test_meta_gradient import double_tasks
from tests.test_training import SHORT


def meta_gradient(algorithm, tasks) -> list[torch.Tensor]:
    learner = MetaLearner(algorithm, optimizer=torch.optim.Adam, problem="regression")
    learner.log = lambda *args, **kwargs: None  # no Trainer attached
    learner.training_step(tasks, 0).backward()
    return [p.grad.clone() for p in algorithm.parameters()]


def test_metasgd_meta_gradient_matches_learn2learn_loop() -> None:
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1).double()
    reference = l2l.algorithms.MetaSGD(copy.deepcopy(model), lr=0.05)
    tasks = double_tasks(10)
    ours = meta_gradient(MetaSGD(model, inner_lr=0.05, inner_steps=2), tasks)
    for index in range(len(tasks)):  # learn2learn's documented loop
        learner = reference.clone()
        for _ in range(2):
            learner.adapt(F.mse_loss(learner(tasks.support_x[index]), tasks.support_y[index]))
        (F.mse_loss(learner(tasks.query_x[index]), tasks.query_y[index]) / len(tasks)).backward()
    expected = [p.grad for p in reference.parameters()]
    assert len(ours) == len(expected) == 12  # 6 weights and their 6 learned rates
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_anil_meta_gradient_matches_learn2learn_recipe() -> None:
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1).double()
    reference_model = copy.deepcopy(model)
    tasks = double_tasks(10)
    ours = meta_gradient(ANIL(model, inner_lr=0.1, inner_steps=2), tasks)
    head = l2l.algorithms.MAML(reference_model.head, lr=0.1)  # learn2learn's ANIL example
    for index in range(len(tasks)):
        learner = head.clone()
        support = reference_model.features(tasks.support_x[index])
        for _ in range(2):
            learner.adapt(F.mse_loss(learner(support), tasks.support_y[index]))
        query = reference_model.features(tasks.query_x[index])
        (F.mse_loss(learner(query), tasks.query_y[index]) / len(tasks)).backward()
    expected = [p.grad for p in reference_model.parameters()]
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    assert ours[0].abs().sum() > 0  # the features are meta-learned through the adapted head


def test_anil_refuses_a_model_without_head() -> None:
    with pytest.raises(ConfigError, match="algorithm=anil needs a model with `features` and `head`"):
        ANIL(torch.nn.Linear(1, 1))


def test_reptile_update_matches_hand_computation() -> None:
    """Two tasks, a 1-d linear model y = w·x + b, two inner SGD steps each, outer SGD with ε = 0.5."""
    model = torch.nn.Linear(1, 1).double()
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(-0.2)
    x = torch.tensor([[[1.0], [2.0]], [[-1.0], [3.0]]], dtype=torch.double)  # (T=2, S=2, 1)
    y = torch.tensor([[[1.0], [3.0]], [[0.0], [-2.0]]], dtype=torch.double)
    tasks = type(double_tasks(1))(x, y, x, y)

    def inner(w: float, b: float, xs: list[float], ys: list[float], lr: float = 0.1) -> tuple[float, float]:
        for _ in range(2):  # MSE gradient: d/dw = 2/n Σ (w x + b − y) x, d/db = 2/n Σ (w x + b − y)
            residual = [w * xi + b - yi for xi, yi in zip(xs, ys, strict=True)]
            w, b = (w - lr * 2 / len(xs) * sum(r * xi for r, xi in zip(residual, xs, strict=True)),
                    b - lr * 2 / len(xs) * sum(residual))
        return w, b

    phi = [inner(0.5, -0.2, [1.0, 2.0], [1.0, 3.0]), inner(0.5, -0.2, [-1.0, 3.0], [0.0, -2.0])]
    mean_w, mean_b = (phi[0][0] + phi[1][0]) / 2, (phi[0][1] + phi[1][1]) / 2
    expected_w, expected_b = 0.5 + 0.5 * (mean_w - 0.5), -0.2 + 0.5 * (mean_b + 0.2)

    algorithm = Reptile(model, inner_lr=0.1, inner_steps=2)
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.5)
    _, meta_loss = TaskRunner("loop").meta_loss(algorithm, tasks, Context(F.mse_loss, training=True))
    meta_loss.backward()  # delivers θ − mean(φᵢ), as Lightning's backward does
    optimizer.step()
    assert model.weight.item() == pytest.approx(expected_w, rel=1e-12)
    assert model.bias.item() == pytest.approx(expected_b, rel=1e-12)
    assert model.weight.item() != pytest.approx(0.5)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_logits_match_hand_computed_prototypes(distance: str) -> None:
    torch.manual_seed(0)
    embedding = torch.nn.Linear(4, 3).double()
    support_x, query_x = torch.randn(6, 4, dtype=torch.double), torch.randn(5, 4, dtype=torch.double)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    task = Task(support_x, support_y, query_x, torch.zeros(5, dtype=torch.long))
    algorithm = ProtoNet(embedding, distance=distance, temperature=2.0)
    logits = algorithm.adapt(task, Context(F.cross_entropy, training=True))(query_x)
    prototypes = torch.stack([embedding(support_x[support_y == c]).mean(0) for c in range(3)])
    query = embedding(query_x)
    if distance == "euclidean":
        expected = -((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
    else:
        expected = 2.0 * F.cosine_similarity(query[:, None, :], prototypes[None], dim=-1)
    torch.testing.assert_close(logits, expected)


@pytest.mark.slow  # 45-95 s each on 2 cores: run by `make test-slow` (.ci/run runs it after `make test`)
@pytest.mark.parametrize(("algorithm", "overrides"), [
    ("fomaml", ["trainer.max_steps=800", "algorithm.inner_lr=0.02", "algorithm.inner_steps=5",
                "algorithm.eval_inner_steps=10"]),
    ("metasgd", ["trainer.max_steps=600"]),
    ("reptile", ["trainer.max_steps=600", "algorithm.inner_lr=0.02", "optimizer.lr=0.5"]),
])
def test_gradient_based_algorithms_learn_sinusoids(job, algorithm: str, overrides: list[str]) -> None:
    metrics = train(job("tracking=none", f"algorithm={algorithm}", *SHORT, "trainer.val_check_interval=1000",
                        *overrides))
    assert metrics["meta_test/post_loss"] < 0.5 * metrics["meta_test/pre_loss"], metrics


KANJI = ["task=kanji", *SHORT, "task.num_classes=300", "task.queries=5", "task.meta_batch_size=8",
         "task.test_tasks=100", "model.hidden_size=32", "trainer.val_check_interval=1000"]


@pytest.mark.parametrize(("algorithm", "overrides"), [
    ("protonet", ["trainer.max_steps=60"]),
    pytest.param("anil", ["trainer.max_steps=150", "algorithm.inner_lr=0.5", "algorithm.inner_steps=3"],
                 marks=pytest.mark.slow),  # ~30 s; `make test` keeps the protonet run
    pytest.param("metaoptnet", ["trainer.max_steps=60"], id="metaoptnet-svm", marks=pytest.mark.slow),  # ~26 s
    pytest.param("metaoptnet", ["trainer.max_steps=60", "algorithm.head=ridge"], id="metaoptnet-ridge",
                 marks=pytest.mark.slow),  # ~14-30 s
    pytest.param("r2d2", ["trainer.max_steps=100"], id="r2d2", marks=pytest.mark.slow),  # ~19 s
])
def test_classifiers_learn_kanji_well_above_chance(job, kanji_cache, algorithm: str, overrides: list[str]) -> None:
    metrics = train(job("tracking=none", f"algorithm={algorithm}", *KANJI, f"task.cache_dir={kanji_cache}",
                        *overrides))
    assert metrics["meta_test/post_acc"] > 0.5, metrics  # chance is 0.2


def test_metasgd_logs_learned_rates_and_histogram(job, tmp_path) -> None:
    train(job("algorithm=metasgd", "debug=smoke"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    metrics = run.data.metrics
    rates = saved_parameters(tmp_path / "run0", ".lrs.")  # the rates the run ended with, from its checkpoint
    assert rates.numel() == 1 + 40 + 40 + 40 * 40 + 40 + 40  # one per weight of MLP(1, (40, 40), 1)
    for name, value in {"mean": rates.mean(), "std": rates.std(), "min": rates.min(), "max": rates.max()}.items():
        assert metrics[f"metasgd/lr_{name}"] == pytest.approx(value.item(), rel=1e-6), name
    assert metrics["metasgd/lr_std"] > 0  # 20 meta-steps moved the rates away from their common start
    assert "metasgd_lrs.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def saved_parameters(run_dir, marker: str) -> torch.Tensor:
    """Every saved tensor whose state-dict key contains ``marker``, flattened, from the run's last checkpoint."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return torch.cat([value.flatten().double() for key, value in state.items() if marker in key])


def learns_classification(option: Path) -> bool:
    return "classification" in get_class(yaml.safe_load(option.read_text())["_target_"]).problems


# every option that learns classification tasks (maml_trpo learns environments: tests/test_meta_rl.py)
ALGORITHMS = sorted(path.stem for path in (config_dir() / "algorithm").glob("*.yaml") if learns_classification(path))


# options whose classifier is built from each episode's support set (ProtoNet, Proto-MAML, MetaOptNet, R2-D2): they
# have no "before adaptation" predictor, so no pre_* metrics
BUILT_FROM_SUPPORT = {path.stem for path in (config_dir() / "algorithm").glob("*.yaml")
                      if issubclass(get_class(yaml.safe_load(path.read_text())["_target_"]), PrototypeBased)}


def test_before_adaptation_is_the_model_except_for_protonet() -> None:
    model = MLP(1, (4,), 1)
    task, context = double_tasks(1)[0], Context(F.mse_loss, training=False)
    assert ANIL(model).unadapted(task, context) is model
    assert ProtoNet(model).unadapted(task, context) is None  # prototypes need the support set: no "pre" metric


def test_every_algorithm_logs_the_same_metric_names(job, tmp_path, kanji_cache) -> None:
    for algorithm in ALGORITHMS:
        train(job(f"algorithm={algorithm}", "task=kanji", "debug=smoke", f"task.cache_dir={kanji_cache}",
                  "task.num_classes=300", "task.queries=5", "task.meta_batch_size=2", "model.hidden_size=8",
                  "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
                  "task.val_tasks=4", "task.test_tasks=4"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("kanji").experiment_id])
    assert sorted(run.data.tags["metalab.algorithm"] for run in runs) == sorted(ALGORITHMS)
    names = {run.data.tags["metalab.algorithm"]: {m for m in run.data.metrics
                                                  if m.startswith(("meta_", "pretrain/", "epoch"))}
             for run in runs}  # besides an algorithm's own (metasgd/*, maml_pp/*)
    for algorithm, logged in names.items():
        # No "before adaptation" where the head is built from the support set (ProtoNet, Proto-MAML, MetaOptNet,
        # R2-D2) or fitted on it (finetune); finetune's training is pre-training on labelled examples, not episodes.
        phases = ("post",) if algorithm in BUILT_FROM_SUPPORT or algorithm == "finetune" else ("pre", "post")
        training = ("pretrain/loss", "pretrain/acc") if algorithm == "finetune" else ("meta_train/loss",
                                                                                       "meta_train/post_acc")
        expected = {training[0], *(f"meta_{stage}/{when}_{kind}{ci}" for stage in ("val", "test")
                                   for when in phases for kind in ("loss", "acc") for ci in ("", "_ci95"))}
        assert expected <= logged, (algorithm, expected - logged)
        assert logged - expected == {training[1], "epoch"}, (algorithm, logged - expected)
