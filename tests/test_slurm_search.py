"""One Optuna study searched by a SLURM job array: each array task is a `metalab-train hparams_search=...` worker
in its own allocation, all naming one study, as docker/README.md shows. Runs on the test cluster of
tests/test_slurm.py (``$METALAB_TEST_SLURM_CONF``); the study goes to the tracking server's PostgreSQL where CI
provides it, else to a journal file in the test's folder (the cluster's one node shares it)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from metalab.search.sweeper import SURPLUS
from tests.conftest import BIN, experiment_name
from tests.test_slurm import slurm_conf

pytestmark = pytest.mark.slow  # ~60 s: two SLURM jobs' start-ups and 4 short trials; .ci/run's `make test-slow`


def test_a_slurm_job_array_of_workers_runs_each_trial_of_one_study_once(tmp_path: Path) -> None:
    conf = slurm_conf()
    name = experiment_name("array")
    storage = os.environ.get("METALAB_TEST_STUDY_STORAGE") or str(tmp_path / "study.journal")
    tracking = os.environ.get("METALAB_TEST_SERVER_URI", "").rstrip("/") or f"sqlite:///{tmp_path}/mlflow.db"
    worker = [str(BIN / "metalab-train"), "hparams_search=maml_optuna", "debug=smoke", "algorithm.inner_steps=1",
              "trainer.val_check_interval=5", "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}",
              f"hydra.sweeper.study_name={name}", f"tracking.tracking_uri={tracking}",
              f"tracking.experiment_name={name}"]
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")} | {"SLURM_CONF": conf}
    done = subprocess.run(["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", "--mem=1G", "--time=10",
                           f"--output={tmp_path}/worker_%a.out", f"--chdir={tmp_path}", "--wrap",
                           f"{shlex.join(worker)} hydra.sweep.dir={tmp_path}/worker$SLURM_ARRAY_TASK_ID"],
                          env=environment, capture_output=True, text=True, timeout=600)
    outputs = [(tmp_path / f"worker_{task}.out").read_text() for task in (0, 1)]
    assert done.returncode == 0, (done.stderr, outputs)
    assert sorted("(created by this worker)" in out for out in outputs) == [False, True]  # one created, one joined
    study = optuna.load_study(study_name=name, storage=storage if "://" in storage else
                              optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage)))
    trials = [t for t in study.trials if SURPLUS not in t.user_attrs]
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.intermediate_values for t in trials)
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent") == "true"]
    jobs = [run for run in runs if run is not parent]
    assert sorted(int(run.data.tags["metalab.optuna_trial"]) for run in jobs) == [0, 1, 2, 3]  # each once
    array = done.stdout.split()[-1]  # "Submitted batch job <id>"
    assert {run.data.tags["metalab.slurm_job_id"].split("_")[0] for run in jobs} == {array}
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/jobs"] == 4
