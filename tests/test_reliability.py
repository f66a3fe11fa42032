"""Runs that go wrong stop early, say why in one line, and leave MLflow and the checkpoints consistent."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from metalab.errors import ConfigError
from metalab.reliability import DivergenceError
from metalab.train import train
from tests.conftest import BIN, compose_job, run_cli


def test_divergence_stops_at_the_first_bad_step_and_fails_the_run(job, tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"meta_train/loss is (nan|inf) at step 0: training diverged"):
        train(job("debug=smoke", "algorithm.inner_lr=1e30", "runner.backend=loop"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["metalab.error"]


def test_divergence_from_the_command_line_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["debug=smoke", "algorithm.inner_lr=1e30"], cwd=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("metalab: error:")]
    assert len(lines) == 1 and "meta_train/loss is" in lines[0] and "lower optimizer.lr" in lines[0]
    assert "Traceback" not in result.stderr


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    result = run_cli(["debug=smoke", f"tracking.tracking_uri=http://127.0.0.1:{port}"], cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"MLflow tracking server http://127.0.0.1:{port} does not answer" in lines[0]
    assert not list(tmp_path.glob("outputs/*/*/checkpoints/*.ckpt"))  # no training happened
    assert elapsed < 60  # imports dominate; the probe itself times out in 3 s


def test_unwritable_sqlite_folder_is_refused(job) -> None:
    with pytest.raises(ConfigError, match="folder /nonexistent/folder does not exist or is not writable"):
        train(job("debug=smoke", "tracking.tracking_uri=sqlite:////nonexistent/folder/mlflow.db"))


def test_killed_run_resumes_into_the_same_mlflow_run_and_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    common = ["debug=smoke", "trainer.max_steps=300", "trainer.val_check_interval=100",
              "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=10", "runner.backend=loop",
              "seed=3"]
    (tmp_path / "reference").mkdir()
    reference = run_cli([*common, f"tracking.tracking_uri=sqlite:///{tmp_path}/reference.db"],
                        cwd=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    store = f"sqlite:///{tmp_path}/mlflow.db"
    process = subprocess.Popen([str(BIN / "metalab-train"), *common, f"tracking.tracking_uri={store}"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_environment())
    deadline = time.monotonic() + 120
    while not any(int(p.stem.split("step=")[1]) >= 30 for p in tmp_path.glob("outputs/*/*/checkpoints/*step=*.ckpt")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no clean-up of any kind
    process.wait()

    client = MlflowClient(store)
    [killed] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert killed.info.status == "RUNNING"  # what a hard kill leaves behind
    resumed = run_cli([*common, f"tracking.tracking_uri={store}", f"resume={killed.info.run_id}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["metalab.resumed_from"].endswith("last.ckpt")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")]
    assert len(steps) == len(set(steps))  # no step logged twice
    ordered = sorted(steps)
    assert ordered[-1] == 299 and max(b - a for a, b in itertools.pairwise(ordered)) <= 10  # gaps < an interval
    reference_client = MlflowClient(f"sqlite:///{tmp_path}/reference.db")
    [uninterrupted] = reference_client.search_runs([reference_client.get_experiment_by_name("sinusoid").experiment_id])
    for name in ("meta_test/post_loss", "meta_test/pre_loss", "meta_val/post_loss"):
        assert run.data.metrics[name] == pytest.approx(uninterrupted.data.metrics[name], rel=1e-6), name


def test_requeued_job_continues_the_run_it_began_in_its_output_folder(tmp_path: Path) -> None:
    """``resume=auto`` (hardware=slurm sets it): a job restarted in its own output folder, as submitit requeues
    it, continues the MLflow run begun there; a job in a fresh folder starts a new run."""
    settings = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "debug=smoke", "resume=auto",
                "trainer.val_check_interval=5", "runner.backend=loop", "trainer.log_every_n_steps=1"]
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=10"]))
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=20"]))  # the requeued job goes on
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sinusoid").experiment_id
    [run] = client.search_runs([experiment])
    assert run.info.status == "FINISHED" and run.data.tags["metalab.resumed_from"].endswith("last.ckpt")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")]
    assert sorted(steps) == list(range(20))  # the second part continued at step 10, nothing logged twice
    train(compose_job(tmp_path / "fresh", [*settings, "trainer.max_steps=5"]))
    assert len(client.search_runs([experiment])) == 2


def test_resume_of_an_unknown_run_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["debug=smoke", "resume=0123456789abcdef0123456789abcdef"], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert result.returncode == 1 and len(lines) == 1
    assert "resume=0123456789abcdef0123456789abcdef: no MLflow run with that id" in lines[0]


def clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}


def test_ctrl_c_saves_a_checkpoint_and_marks_the_run_killed(tmp_path: Path) -> None:
    process = subprocess.Popen([str(BIN / "metalab-train"), "debug=smoke", "trainer.max_steps=100000",
                                "callbacks.checkpoint.every_n_train_steps=10", "runner.backend=loop"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_environment())
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("outputs/*/*/checkpoints/*step=*.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "KILLED"
    assert Path(run.data.tags["metalab.checkpoint_dir"], "interrupted.ckpt").is_file()
    assert "Traceback" not in stderr


@pytest.mark.slow  # ~90 s on 2 cores: run by `make test-slow` (.ci/run runs it after `make test`)
def test_eight_parallel_jobs_on_the_embedded_store_all_record_every_metric(tmp_path: Path) -> None:
    result = run_cli(["-m", "debug=smoke", "seed=0,1,2,3,4,5,6,7", "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=8", "trainer.log_every_n_steps=1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    jobs = [run for run in runs if run.data.tags.get("metalab.sweep_parent") != "true"]
    assert len(jobs) == 8 and {run.info.status for run in jobs} == {"FINISHED"}
    assert sorted(run.data.params["seed"] for run in jobs) == [str(seed) for seed in range(8)]
    for run in jobs:  # every step of every job made it to SQLite
        assert [m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")] == list(range(20))
        assert {"meta_val/post_loss", "meta_test/post_loss", "meta_test/post_loss_ci95"} <= set(run.data.metrics)
