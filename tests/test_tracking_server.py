"""Runs tracked over HTTP by the lab's tracking server (PostgreSQL backend, proxied artifacts), read back
through it. The server is the one at ``$METALAB_TEST_SERVER_URI``: .ci/run starts it with
scripts/tracking_server.sh, as docker/compose.yaml runs it."""

from __future__ import annotations

import math
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import experiment_name, run_cli


def runs_of(client: MlflowClient, name: str) -> list[Run]:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name} on the server"
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    return client.search_runs([experiment.experiment_id])


def assert_tracked_through_the_server(client: MlflowClient, run: Run, tmp_path: Path) -> None:
    """FINISHED, with the config as params, test metrics, and its artifacts downloadable through the server."""
    assert run.info.status == "FINISHED", run.data.tags.get("metalab.error")
    assert run.data.params["algorithm.inner_lr"] == "0.01" and run.data.params["trainer.max_steps"] == "20"
    loss = run.data.metrics["meta_test/post_loss"]
    assert math.isfinite(loss) and loss > 0
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "meta_train/loss")]
    assert len(steps) >= 3 and max(steps) >= 15  # streamed asynchronously during training, every 5 steps
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    listed = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/config.yaml", "config/overrides.yaml"} <= listed
    local = Path(client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path)))
    config = local.read_text()
    assert "inner_lr: 0.01" in config and f"seed: {run.data.params['seed']}" in config


def test_a_run_logs_to_the_server_and_reads_back(server: str, tmp_path: Path) -> None:
    name = experiment_name("run")
    result = run_cli(["debug=smoke", f"tracking.tracking_uri={server}", f"tracking.experiment_name={name}",
                      "trainer.max_steps=20"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(server)
    [run] = runs_of(client, name)
    assert_tracked_through_the_server(client, run, tmp_path / "download")


def test_the_compose_trainer_s_environment_variable_reaches_the_server(server: str, tmp_path: Path) -> None:
    """docker/compose.yaml's trainer sets MLFLOW_TRACKING_URI only: the default config must follow it."""
    name = experiment_name("env")
    result = run_cli(["debug=smoke", f"tracking.experiment_name={name}", "trainer.max_steps=20"],
                     cwd=tmp_path, env={"MLFLOW_TRACKING_URI": server})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store
    [run] = runs_of(MlflowClient(server), name)
    assert run.info.status == "FINISHED"


def test_a_sweep_nests_its_jobs_under_one_parent_on_the_server(server: str, tmp_path: Path) -> None:
    name = experiment_name("sweep")
    result = run_cli(["-m", "debug=smoke", f"tracking.tracking_uri={server}", f"tracking.experiment_name={name}",
                      "trainer.max_steps=20", "seed=0,1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(server)
    runs = runs_of(client, name)
    [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent") == "true"]
    children = [run for run in runs if run is not parent]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/jobs_finished"] == 2 and parent.data.metrics["sweep/jobs_failed"] == 0
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert sorted(run.data.params["seed"] for run in children) == ["0", "1"]
    for run in children:
        assert_tracked_through_the_server(client, run, tmp_path / "download" / run.info.run_id)
