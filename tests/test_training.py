"""Real, short MAML runs on sinusoids: the model learns, MLflow holds the run, same seed → same numbers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from metalab.job import train
from metalab.learner import MetaLearner
from tests.conftest import compose_job

SHORT = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "task.test_tasks=200",
         "task.val_tasks=50"]


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], MlflowClient, str, Path]:
    """One 1000-step MAML run on the demo's settings, tracked in a private store."""
    root = tmp_path_factory.mktemp("maml")
    cfg = compose_job(root / "run", [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", *SHORT,
                                     "trainer.max_steps=1000", "trainer.val_check_interval=500",
                                     "trainer.log_every_n_steps=50"])
    metrics = train(cfg)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("sinusoid")
    [run] = client.search_runs([experiment.experiment_id])
    return metrics, client, run.info.run_id, root


def test_maml_learns_to_adapt(maml_run, job) -> None:
    metrics, *_ = maml_run
    untrained = train(job("tracking=none", *SHORT, "trainer.max_steps=0"))
    post, pre = metrics["meta_test/post_loss"], metrics["meta_test/pre_loss"]
    assert post < 0.5 * pre, metrics
    assert post < 0.5 * untrained["meta_test/post_loss"], (metrics, untrained)
    assert 0 < metrics["meta_test/post_loss_ci95"] < post


def test_mlflow_run_holds_config_metrics_artifacts_and_tags(maml_run) -> None:
    metrics, client, run_id, root = maml_run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("maml-sinusoid-")
    # every resolved config value is a param
    params = run.data.params
    assert params["algorithm.inner_lr"] == "0.01"
    assert params["algorithm._target_"] == "metalab.algorithms.MAML"
    assert params["task.shots"] == "10" and params["task.meta_batch_size"] == "25"
    assert params["task.seed"] == "0"  # interpolations are resolved
    assert params["model.hidden_sizes"] == "[40, 40]"
    assert params["optimizer.lr"] == "0.001" and params["trainer.max_steps"] == "1000"
    # metrics by step
    train_loss = client.get_metric_history(run_id, "meta_train/loss")
    assert len(train_loss) >= 15 and train_loss[-1].step > train_loss[0].step
    val_steps = sorted(m.step for m in client.get_metric_history(run_id, "meta_val/post_loss"))
    assert len(val_steps) == 2
    for name in ("pre_loss", "post_loss", "pre_loss_ci95", "post_loss_ci95"):
        assert run.data.metrics[f"meta_test/{name}"] == pytest.approx(metrics[f"meta_test/{name}"])
        assert f"meta_val/{name}" in run.data.metrics
    # artifacts: resolved config and overrides
    artifacts = {a.path for a in client.list_artifacts(run_id, "config")}
    assert {"config/config.yaml", "config/overrides.yaml"} <= artifacts
    resolved = yaml.safe_load(Path(client.download_artifacts(run_id, "config/config.yaml", str(root))).read_text())
    assert resolved["algorithm"]["inner_steps"] == 1 and resolved["task"]["seed"] == 0
    overrides = yaml.safe_load(Path(client.download_artifacts(run_id, "config/overrides.yaml", str(root))).read_text())
    assert "trainer.max_steps=1000" in overrides
    # tags: source version and the chosen config options
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["metalab.git.dirty"] in ("true", "false")
    assert tags["metalab.algorithm"] == "maml" and tags["metalab.task"] == "sinusoid"


def test_exception_in_training_marks_run_failed_with_the_error(job, tmp_path, monkeypatch) -> None:
    original = MetaLearner.training_step

    def fail_at_step_3(self, tasks, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("exploded at step 3")
        return original(self, tasks, batch_idx)

    monkeypatch.setattr(MetaLearner, "training_step", fail_at_step_3)
    with pytest.raises(RuntimeError, match="exploded at step 3"):
        train(job(*SHORT, "trainer.max_steps=10", "trainer.log_every_n_steps=1"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["metalab.error"] == "RuntimeError: exploded at step 3"
    assert len(client.get_metric_history(run.info.run_id, "meta_train/loss")) == 3  # steps 0-2 kept


def test_interrupt_marks_run_killed(job, tmp_path, monkeypatch) -> None:
    def interrupt(self, tasks, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(MetaLearner, "training_step", interrupt)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown
            train(job(*SHORT, "trainer.max_steps=10"))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C after the first
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "KILLED"
    assert Path(run.data.tags["metalab.checkpoint_dir"], "interrupted.ckpt").is_file()  # nothing trained is lost


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(job) -> None:
    # backend pinned: `auto` picks by timing, and loop and vmap agree to float rounding, not bit for bit
    overrides = ["tracking=none", *SHORT, "trainer.max_steps=30", "trainer.val_check_interval=15",
                 "runner.backend=loop"]
    first = train(job(*overrides, "seed=7"))
    second = train(job(*overrides, "seed=7"))
    other = train(job(*overrides, "seed=8"))
    assert first == second
    assert first["meta_test/post_loss"] != other["meta_test/post_loss"]


def test_sampling_workers_serve_the_same_task_stream(job) -> None:
    """Meta-batches drawn by 2 worker processes, in turn, are the batches drawn in the training process."""
    overrides = ["tracking=none", *SHORT, "trainer.max_steps=12", "trainer.val_check_interval=12",
                 "runner.backend=loop"]
    assert train(job(*overrides, "sampling_workers=2")) == train(job(*overrides, "sampling_workers=0"))


@pytest.mark.slow  # ~60 s; `make test` keeps kanji learning in tests/test_algorithms.py (protonet)
def test_fomaml_learns_kanji_5way_1shot_well_above_chance(job, kanji_cache) -> None:
    """A short real run on the offline image family: CNN4 (32 channels) from scratch, 150 meta-iterations."""
    metrics = train(job("task=kanji", "model=cnn4", "algorithm=fomaml", *SHORT, f"task.cache_dir={kanji_cache}",
                        "task.num_classes=300", "task.queries=5", "task.meta_batch_size=8", "task.test_tasks=100",
                        "model.hidden_size=32", "algorithm.inner_lr=0.4", "algorithm.inner_steps=3",
                        "trainer.max_steps=150", "trainer.val_check_interval=150"))
    assert metrics["meta_test/pre_acc"] == pytest.approx(0.2, abs=0.05)  # chance before adaptation
    assert metrics["meta_test/post_acc"] > 0.5, metrics  # chance is 0.2
