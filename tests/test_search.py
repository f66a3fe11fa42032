"""metalab's Optuna sweeper (hydra/sweeper=optuna): the search space, pruning from the Lightning loop, and one
study shared by several workers (SQLite here, PostgreSQL on the lab's tracking server's database)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from metalab.errors import ConfigError
from metalab.search.space import search_space
from metalab.search.study import JOURNAL
from metalab.search.sweeper import SURPLUS
from tests.conftest import BIN, experiment_name, run_cli, set_by_ci

QUICK = ["hparams_search=maml_optuna", "debug=smoke", "algorithm.inner_steps=1", "trainer.val_check_interval=5"]


def test_hydra_sweep_syntax_becomes_optuna_distributions() -> None:
    space = search_space(["a=choice(x,y,3)", "b=range(1,5)", "c=range(0,10,3)", "d=interval(0.1,0.5)",
                          "e=tag(log,interval(1e-4,1e-1))", "f=interval(2,8)", "g=7", "b=2"])
    assert space.distributions == {
        "a": CategoricalDistribution(["x", "y", 3]),
        "c": IntDistribution(0, 9, step=3),  # Hydra's range excludes its stop: 0, 3, 6, 9
        "d": FloatDistribution(0.1, 0.5),
        "e": FloatDistribution(1e-4, 1e-1, log=True),
        "f": FloatDistribution(2.0, 8.0)}  # Hydra reads an interval's ends as floats
    assert space.fixed == ["g=7", "b=2"]  # a later plain value replaces the search of b
    assert space.overrides({"a": "x", "d": 0.25}) == ["a=x", "d=0.25", "g=7", "b=2"]
    assert search_space(["b=range(1,5)"]).distributions["b"] == IntDistribution(1, 4)


@pytest.mark.parametrize(("override", "message"), [
    ("lr=range(0.1,0.5,0.1)", r"lr: range\(\) of floats cannot be searched; use interval\(0.1, 0.5\) or choice"),
    ("steps=range(5,5)", r"steps=range\(5, 5\) holds no value"),
    ("model=glob(*)", r"^model=glob\(\*\): Optuna cannot search a glob; name the options in choice\(\.\.\.\)$"),
])
def test_a_space_optuna_cannot_search_is_one_line_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        search_space([override])


def journal_study(sweep_dir: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name="maml_inner_loop",
                             storage=JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL))))


def test_a_trial_worse_than_the_median_is_pruned_and_its_run_says_why(tmp_path: Path) -> None:
    """optimizer.lr=1e-9 learns nothing: once a trial with lr=0.003 completed, such a trial is worse than the
    median at the first validation and is pruned there. The seeded random sampler draws 1e-9, 0.003, 1e-9, 1e-9."""
    result = run_cli(["-m", *QUICK, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                      "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner.n_startup_trials=1",
                      "optimizer.lr=choice(0.003,1e-9)", "algorithm.inner_lr=0.01", f"hydra.sweep.dir={tmp_path}/s"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Error executing job" not in result.stderr and "Traceback" not in result.stderr
    study = journal_study(tmp_path / "s")
    assert [(t.params["optimizer.lr"], t.state) for t in study.trials] == [
        (1e-9, TrialState.COMPLETE), (0.003, TrialState.COMPLETE), (1e-9, TrialState.PRUNED),
        (1e-9, TrialState.PRUNED)]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    runs = {int(run.data.tags["metalab.optuna_trial"]): run for run in client.search_runs([experiment])
            if "metalab.optuna_trial" in run.data.tags}
    assert sorted(runs) == [0, 1, 2, 3]
    completed_at_4 = sorted(t.intermediate_values[4] for t in study.trials[:2])
    for number in (2, 3):
        run = runs[number]
        assert run.info.status == "KILLED" and run.data.tags["metalab.pruned"] == "true"
        assert run.data.tags["metalab.pruned_at_step"] == "4" and "metalab.error" not in run.data.tags
        history = client.get_metric_history(run.info.run_id, "meta_val/post_loss")
        assert [m.step for m in history] == [4]  # stopped at the validation that pruned it (after 5 steps)
        assert not any(key.startswith("meta_test/") for key in run.data.metrics)
        assert run.data.tags["mlflow.note.content"] == (
            f"Pruned: trial {number} of Optuna study maml_inner_loop was stopped at step 4 by MedianPruner: "
            f"meta_val/post_loss was {history[0].value:.6g}; the median of the 2 completed trials there was "
            f"{sum(completed_at_4) / 2:.6g}. It stopped on purpose, so it has no meta_test metrics and no model.")
        assert f"metalab: Pruned: trial {number} of Optuna study maml_inner_loop" in result.stdout
    assert {runs[n].info.status for n in (0, 1)} == {"FINISHED"}
    [parent] = [run for run in client.search_runs([experiment]) if run.data.tags.get("metalab.sweep_parent")]
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/jobs_pruned"] == 2
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(study.best_value)
    assert "4 jobs, 2 finished, 0 failed, 2 pruned" in result.stdout


def test_a_study_in_a_database_goes_on_where_the_last_search_stopped(tmp_path: Path) -> None:
    """Two searches naming one SQLite study: the second runs only the trials the study still lacks (n_trials
    counts the whole study), numbered after the first's, nested under the same parent run, which it reopens."""
    study = [f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db", "hydra.sweeper.study_name=shared"]
    first = run_cli([*QUICK, *study, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/a"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli([*QUICK, *study, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}/b"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(created by this worker)" in first.stdout and "(joined by this worker)" in second.stdout
    stored = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path}/study.db")
    assert [(t.number, t.state) for t in stored.trials] == [(n, TrialState.COMPLETE) for n in range(3)]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent")]
    trials = sorted(int(run.data.tags["metalab.optuna_trial"]) for run in runs if run is not parent)
    assert trials == [0, 1, 2]
    assert {run.data.tags["mlflow.parentRunId"] for run in runs if run is not parent} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/jobs"] == 3
    assert parent.data.tags["metalab.optuna_study"] == "shared"
    assert stored.user_attrs["metalab.sweep"]["parent_run_id"] == parent.info.run_id
    assert re.search(r"-#2$", max(runs, key=lambda run: run.info.start_time).info.run_name)  # named by trial number


@pytest.mark.parametrize(("setting", "message"), [
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0, n_jobs=1: both must be at least 1"),
    ("hydra.sweeper.max_failure_rate=2", "hydra.sweeper.max_failure_rate=2: a fraction, from 0 to 1"),
    ("hydra.sweeper.direction=up", "hydra.sweeper.direction=up: minimize or maximize"),
])
def test_a_setting_the_search_cannot_run_with_is_one_line_before_any_run(tmp_path: Path, setting: str,
                                                                         message: str) -> None:
    result = run_cli([*QUICK, setting, "tracking=none"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"metalab: error: {message}"]


def test_a_study_in_a_database_needs_a_name_said_in_one_line(tmp_path: Path) -> None:
    result = run_cli([*QUICK, f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db", "hydra.sweeper.study_name=null"],
                     cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "metalab: error: hydra.sweeper.study_name: a study kept in hydra.sweeper.storage needs a name, the same in "
        "every worker that shares it"]


@pytest.fixture(scope="module")
def study_storage(server: str) -> str:
    """The SQLAlchemy URL of the Optuna database beside the tracking server's (scripts/tracking_server.sh
    study-storage)."""
    return set_by_ci("METALAB_TEST_STUDY_STORAGE", "the study database", "start the tracking server "
                     "(scripts/tracking_server.sh start DIR) and set METALAB_TEST_STUDY_STORAGE=$(scripts/"
                     "tracking_server.sh study-storage DIR)")


def test_three_workers_share_one_postgresql_study_and_run_each_trial_once(server: str, study_storage: str,
                                                                          tmp_path: Path) -> None:
    """Three `metalab-train` processes started together on one study of 7 trials, tracked by the lab's server:
    7 trials in all, each run once (one MLflow run per trial number, all under one parent), every job reporting
    its validations to the shared study (what the pruner reads), the parent FINISHED by the last worker to end."""
    name = experiment_name("study")
    command = [str(BIN / "metalab-train"), *QUICK, f"hydra.sweeper.storage={study_storage}",
               f"hydra.sweeper.study_name={name}", "hydra.sweeper.n_trials=7",
               "hydra.sweeper.pruner.n_startup_trials=2",               f"tracking.tracking_uri={server}",
               f"tracking.experiment_name={name}"]
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    workers = [subprocess.Popen([*command, f"hydra.sweep.dir={tmp_path}/worker{i}"], cwd=tmp_path, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    assert sum("(created by this worker)" in out for out, _ in outputs) == 1
    study = optuna.load_study(study_name=name, storage=study_storage)
    trials = [t for t in study.trials if SURPLUS not in t.user_attrs]
    assert [t.number for t in trials] == list(range(7))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert all(t.intermediate_values for t in trials)  # reported from the jobs' processes
    assert all(t.state == TrialState.FAIL for t in study.trials if SURPLUS in t.user_attrs)
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent")]
    jobs = [run for run in runs if run is not parent]
    assert sorted(int(run.data.tags["metalab.optuna_trial"]) for run in jobs) == list(range(7))  # each once
    assert {run.data.tags["mlflow.parentRunId"] for run in jobs} == {parent.info.run_id}
    state = {t.number: t.state for t in trials}
    for run in jobs:  # the run's end is the trial's
        pruned = state[int(run.data.tags["metalab.optuna_trial"])] == TrialState.PRUNED
        assert run.info.status == ("KILLED" if pruned else "FINISHED")
        assert (run.data.tags.get("metalab.pruned") == "true") == pruned
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/jobs"] == 7
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(study.best_value)
