"""Sweeps as a researcher runs them: nested MLflow runs, failures counted, Optuna's best trial, SLURM
submission, and `metalab compare` over the result."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pytest
import submitit
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from metalab.compare import compare
from metalab.errors import ConfigError
from metalab.job import train
from tests.conftest import BIN, compose_job, run_cli


def sweep_runs(root: Path) -> tuple[MlflowClient, object, list]:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent") == "true"]
    return client, parent, [run for run in runs if run is not parent]


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    result = run_cli(["-m", "debug=smoke", "algorithm=maml,fomaml", "seed=0,1"], cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def test_two_by_two_sweep_nests_four_finished_runs_under_one_parent(two_by_two: Path) -> None:
    _client, parent, children = sweep_runs(two_by_two)
    assert len(children) == 4 and {run.info.status for run in children} == {"FINISHED"}
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert {run.data.tags["metalab.sweep_id"] for run in children} == {parent.data.tags["metalab.sweep_id"]}
    combos = {(run.data.params["algorithm.first_order"], run.data.params["seed"]) for run in children}
    assert combos == {("False", "0"), ("False", "1"), ("True", "0"), ("True", "1")}
    assert parent.data.metrics["sweep/jobs_finished"] == 4 and parent.data.metrics["sweep/jobs_failed"] == 0
    assert parent.info.status == "FINISHED"


def test_jobs_of_a_sweep_have_distinct_readable_run_names(two_by_two: Path) -> None:
    _client, _parent, children = sweep_runs(two_by_two)
    # <algorithm>-<task>-<swept values but those two>-#<job number>, in Hydra's order of the jobs
    assert sorted(run.info.run_name for run in children) == [
        "fomaml-sinusoid-seed=0-#2", "fomaml-sinusoid-seed=1-#3", "maml-sinusoid-seed=0-#0", "maml-sinusoid-seed=1-#1"]


def test_compare_matches_search_runs_and_writes_plots(two_by_two: Path) -> None:
    uri = f"sqlite:///{two_by_two}/mlflow.db"
    _, parent, _ = sweep_runs(two_by_two)
    sweep_id = parent.data.tags["metalab.sweep_id"]
    result = compare(uri, sweep_id=sweep_id, out=two_by_two / "report")
    assert result.metric == "meta_test/post_loss"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sweeps"], filter_string=f"tags.`metalab.sweep_id` = '{sweep_id}'")
    runs = runs[runs["tags.metalab.sweep_parent"] != "true"]
    for algorithm in ("maml", "fomaml"):  # by hand: mean and t(0.975, 1)·s/√n over the two seeds
        values = runs[runs["tags.metalab.algorithm"] == algorithm]["metrics.meta_test/post_loss"].to_numpy()
        row = result.table[(result.table["row"] == algorithm) & (result.table["column"] == "sinusoid")].iloc[0]
        assert row["n"] == 2
        assert row["mean"] == pytest.approx(values.mean())
        assert row["ci95"] == pytest.approx(12.706205 * values.std(ddof=1) / math.sqrt(2), rel=1e-6)
    assert result.table["best"].sum() == 1 and result.table.loc[result.table["best"], "mean"].iloc[0] == \
        result.table["mean"].min()  # a loss: lower is better
    markdown = (two_by_two / "report" / "table.md").read_text()
    assert "| maml |" in markdown and "**" in markdown
    with Image.open(two_by_two / "report" / "learning_curves.png") as image:
        assert image.size[0] > 200 and image.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/table.md", "compare/table.csv", "compare/learning_curves.png"} <= logged


def test_compare_says_what_is_wrong_in_one_line(two_by_two: Path) -> None:
    uri = f"sqlite:///{two_by_two}/mlflow.db"
    with pytest.raises(ConfigError, match="no finished run matches"):
        compare(uri, sweep_id="sweep-nope")
    with pytest.raises(ConfigError, match=r"logged metric 'meta_test/post_acc'; these did: .*post_loss"):
        compare(uri, metric="meta_test/post_acc")
    with pytest.raises(ConfigError, match="no experiment named nope"):
        compare(uri, experiments=["nope"])
    done = subprocess.run([str(BIN / "metalab"), "compare", "--tracking-uri", uri, "--metric", "nope"],
                          capture_output=True, text=True, cwd=two_by_two)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "metric 'nope'" in done.stderr


def test_failing_job_does_not_stop_a_parallel_sweep(tmp_path: Path) -> None:
    result = run_cli(["-m", "debug=smoke", "algorithm=maml,protonet", "task.shots=5,10",
                      "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("algorithm=protonet learns classification tasks only") == 2
    _client, parent, children = sweep_runs(tmp_path)
    statuses = sorted((run.data.tags["metalab.algorithm"], run.info.status) for run in children)
    assert statuses == [("maml", "FINISHED"), ("maml", "FINISHED"), ("protonet", "FAILED"), ("protonet", "FAILED")]
    failed = [run for run in children if run.info.status == "FAILED"]
    assert all("learns classification tasks only" in run.data.tags["metalab.error"] for run in failed)
    assert parent.data.metrics["sweep/jobs_finished"] == 2 and parent.data.metrics["sweep/jobs_failed"] == 2
    report = compare(f"sqlite:///{tmp_path}/mlflow.db", columns="task.shots", out=tmp_path / "report")
    assert set(report.table["column"]) == {"5", "10"}
    with Image.open(tmp_path / "report" / "accuracy_vs_shots.png") as image:
        image.verify()


def test_optuna_search_records_the_best_trial_on_the_parent_and_logs_without_colour_codes(tmp_path: Path) -> None:
    result = run_cli(["hparams_search=maml_optuna", "debug=smoke", "hydra.sweeper.n_trials=3",
                      f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "A new study created in Journal with name: maml_inner_loop" in result.stdout  # via Hydra's logging
    logs = sorted((tmp_path / "sweep").rglob("*.log"))
    assert len(logs) == 3  # one per trial
    for name, text in [("stdout", result.stdout), ("stderr", result.stderr), *((p.name, p.read_text()) for p in logs)]:
        assert "\x1b[" not in text, name
    client, parent, children = sweep_runs(tmp_path)
    assert len(children) == 3

    def objective(run) -> float:  # the last validation's value: what main() returns to the sweeper
        return client.get_metric_history(run.info.run_id, "meta_val/post_loss")[-1].value
    best = min(children, key=objective)
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(objective(best))
    assert float(parent.data.params["best.algorithm.inner_lr"]) == pytest.approx(
        float(best.data.params["algorithm.inner_lr"]))
    assert parent.data.params["best.algorithm.inner_steps"] == best.data.params["algorithm.inner_steps"]
    assert len({run.data.params["algorithm.inner_lr"] for run in children}) == 3
    for run in children:  # named by the searched values (4 significant digits) and the trial's job number
        inner_lr, steps = float(run.data.params["algorithm.inner_lr"]), run.data.params["algorithm.inner_steps"]
        assert re.fullmatch(rf"maml-sinusoid-algorithm\.inner_lr={inner_lr:.4g}-algorithm\.inner_steps={steps}-#[0-2]",
                            run.info.run_name), run.info.run_name


def test_a_failed_trial_is_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    """Three trials of 5 steps (shorter than the interval: only the final validation); inner_lr=1e30 diverges
    (the sampler, seeded, draws it first, so the search goes on after a failure)."""
    result = run_cli(["-m", "hparams_search=maml_optuna", "hydra.sweeper.n_trials=3", "debug=smoke",
                      "trainer.max_steps=5", "algorithm.inner_lr=choice(0.01,1e30)", "algorithm.inner_steps=1",
                      "runner.backend=loop"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    _client, parent, children = sweep_runs(tmp_path)
    children.sort(key=lambda run: run.info.start_time)
    diverging = [float(run.data.params["algorithm.inner_lr"]) == 1e30 for run in children]
    assert len(children) == 3 and diverging[0] and not all(diverging)
    assert [run.info.status for run in children] == ["FAILED" if bad else "FINISHED" for bad in diverging]
    errors = [line for line in result.stderr.splitlines() if line.startswith("metalab: error:")]
    assert len(errors) == sum(diverging) and all("training diverged" in line for line in errors)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/jobs_failed"] == sum(diverging)
    assert parent.data.metrics["sweep/jobs_finished"] == 3 - sum(diverging)
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(
        min(run.data.metrics["meta_val/post_loss"] for run in finished))

    sweep_id = parent.data.tags["metalab.sweep_id"]  # printed at the start and at the end, with the command
    command = f"metalab compare --sweep {sweep_id}"
    printed = [line for line in result.stdout.splitlines() if not line.startswith("[")]  # but Hydra's log lines
    assert printed[0].startswith(f"sweep {sweep_id}:") and result.stdout.count(command) == 2
    assert (f"sweep {sweep_id} done: 3 jobs, {3 - sum(diverging)} finished, {sum(diverging)} failed"
            in result.stdout)
    report = compare(f"sqlite:///{tmp_path}/mlflow.db", sweep_id="last", out=tmp_path / "report")
    assert report.sweep_id == sweep_id
    assert [step for step, _ in report.curves[("maml", "sinusoid")]] == [4]  # the one validation, at the last step


def test_a_trial_without_its_objective_fails_its_run(job, tmp_path: Path) -> None:
    """No training step, so no validation: a search could not rank the trial, so its run fails and says why."""
    with pytest.raises(ConfigError, match=r"objective=meta_val/post_loss was not logged by this run \(it logged "
                                          r"meta_test/post_loss, .*\): set objective= to one of them"):
        train(job("hparams_search=maml_optuna", "debug=smoke", "trainer.max_steps=0"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FAILED" and "objective=meta_val/post_loss" in run.data.tags["metalab.error"]


def test_a_search_whose_every_trial_fails_closes_its_parent_failed(tmp_path: Path) -> None:
    result = run_cli(["hparams_search=maml_optuna", "hydra.sweeper.n_trials=1", "debug=smoke",
                      "algorithm.inner_lr=1e30", "runner.backend=loop"], cwd=tmp_path)
    assert result.returncode == 1  # Optuna has no best trial to report
    _client, parent, [child] = sweep_runs(tmp_path)
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"
    assert parent.data.metrics["sweep/jobs_failed"] == 1
    assert f"sweep {parent.data.tags['metalab.sweep_id']} stopped before its end (parent run FAILED)" in result.stderr


def test_compare_last_from_the_command_line_names_the_sweep(two_by_two: Path) -> None:
    _, parent, _ = sweep_runs(two_by_two)
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([str(BIN / "metalab"), "compare", "--sweep", "last", "--out", "last"], capture_output=True,
                          text=True, cwd=two_by_two, env=environment)  # the default store: ./mlflow.db
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"sweep {parent.data.tags['metalab.sweep_id']} (the newest)\n")
    assert (two_by_two / "last" / "learning_curves.png").is_file()


def test_slurm_hardware_builds_the_sbatch_submission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to the submission: Hydra's submitit launcher with conf/hardware/slurm.yaml writes this sbatch file."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that SLURM's srun exists
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    cfg = compose_job(tmp_path / "run", ["hardware=slurm", "hydra.launcher.partition=gpu",
                                         f"hydra.sweep.dir={tmp_path}/sweep"])
    submitted = {}

    def capture(self: submitit.AutoExecutor, fn: object, *args: list) -> list:
        submitted.update(executor=self, jobs=list(zip(*args, strict=True)))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    full = compose_with_hydra(cfg, HydraConfig.get())
    launcher = instantiate(full.hydra.launcher)
    launcher.config = full
    launcher.task_function, launcher.hydra_context = None, None
    launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    assert [job[0] for job in submitted["jobs"]] == [["seed=0"], ["seed=1"]]
    sbatch = submitted["executor"]._executor._make_submission_file_text("python -m metalab.train", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=240",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --signal=USR2@120",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1"):
        assert line in sbatch
    assert cfg.hardware.accelerator == "gpu"
    assert cfg.resume == "auto"  # a requeued job continues its MLflow run (tests/test_reliability.py)
    wide = compose_job(tmp_path / "wide", ["hardware=slurm", "hardware.devices=4", "hardware.strategy=ddp"])
    launcher_settings = compose_with_hydra(wide, HydraConfig.get()).hydra.launcher
    assert (launcher_settings.gpus_per_node, launcher_settings.tasks_per_node) == (4, 4)  # one task per GPU
    assert json.dumps(dict(submitted["executor"]._executor.parameters))  # plain, serialisable parameters


def compose_with_hydra(cfg: DictConfig, hydra_cfg: DictConfig) -> DictConfig:
    """The launcher reads the job config with its ``hydra`` node, as Hydra hands it over."""
    return OmegaConf.merge(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), cfg)
