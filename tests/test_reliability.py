"""Runs that go wrong stop early, say why in one line, and leave MLflow and the checkpoints consistent."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from metalab.reliability import DivergenceError
from metalab.train import train
from tests.conftest import run_cli


def test_divergence_stops_at_the_first_bad_step_and_fails_the_run(job, tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"meta_train/loss is (nan|inf) at step 0: training diverged"):
        train(job("experiment=smoke", "algorithm.inner_lr=1e30", "algorithm.backend=loop"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["metalab.error"]


def test_divergence_from_the_command_line_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["experiment=smoke", "algorithm.inner_lr=1e30"], cwd=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("metalab: error:")]
    assert len(lines) == 1 and "meta_train/loss is" in lines[0] and "lower optimizer.lr" in lines[0]
    assert "Traceback" not in result.stderr


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    result = run_cli(["experiment=smoke", f"tracking.tracking_uri=http://127.0.0.1:{port}"], cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"MLflow tracking server http://127.0.0.1:{port} does not answer" in lines[0]
    assert not list(tmp_path.glob("outputs/*/*/checkpoints/*.ckpt"))  # no training happened
    assert elapsed < 60  # imports dominate; the probe itself times out in 3 s


def test_unwritable_sqlite_folder_is_refused(job) -> None:
    with pytest.raises(Exception, match="does not exist or is not writable"):
        train(job("experiment=smoke", "tracking.tracking_uri=sqlite:////nonexistent/folder/mlflow.db"))
