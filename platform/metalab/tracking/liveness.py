"""Which RUNNING runs still have a process: a run killed hard (SIGKILL, a lost node) stays RUNNING in MLflow.

A run records where its process is (tags ``metalab.host``, ``metalab.pid``, written when training starts or
resumes) and when it was last seen working (``metalab.heartbeat``: UTC time, ISO 8601, written at most every
:data:`HEARTBEAT_EVERY_S` seconds, at the end of a training, validation or test batch). :func:`find_runs` judges
each RUNNING run: on this host, stale if its process is gone (certain); on another host (or without those tags),
stale if its last sign of life (heartbeat, else start time) is older than a threshold. ``metalab runs`` lists
them (:mod:`metalab.runs`); ``--mark-killed`` closes the stale ones as KILLED.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytorch_lightning as pl
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import Callback

from metalab.tracking.logger import report
from metalab.tracking.runs import RunStore

HOST_TAG = "metalab.host"
PID_TAG = "metalab.pid"
HEARTBEAT_TAG = "metalab.heartbeat"
SLURM_JOB_TAG = "metalab.slurm_job_id"
SLURM_RESTARTS_TAG = "metalab.slurm_restarts"
HEARTBEAT_EVERY_S = 30.0  # one tag write per 30 s: nothing next to a step's metric writes
STALE_AFTER = timedelta(minutes=10)  # the default silence after which a run on another host counts as stale


def now() -> str:
    """The heartbeat's value: UTC, to the second (``2026-01-31T12:00:05+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class Heartbeat(Callback):
    """Writes the run's host and process id when fitting or testing starts, and :data:`HEARTBEAT_TAG` then and
    at most every :data:`HEARTBEAT_EVERY_S` seconds after a batch (through the logger: only process 0 of a
    distributed run writes; ``tracking=none``: nothing)."""

    def __init__(self) -> None:
        self._last = float("-inf")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        report(trainer.logger, tags={HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: now(),
                                     **slurm_tags(os.environ)})
        self._last = time.monotonic()

    def _beat(self, trainer: pl.Trainer) -> None:
        if time.monotonic() - self._last >= HEARTBEAT_EVERY_S:
            report(trainer.logger, tags={HEARTBEAT_TAG: now()})
            self._last = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._beat(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._beat(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._beat(trainer)


def slurm_tags(environment: Mapping[str, str]) -> dict[str, str]:
    """Under SLURM, the job's id as ``squeue``/``sacct`` name it (``12_3``: array 12, task 3, as submitit submits a
    sweep) and how often SLURM restarted it (a requeue continues the same run): a run found in MLflow leads to
    its job's logs. Outside SLURM, nothing."""
    if "SLURM_JOB_ID" not in environment:
        return {}
    job = environment["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in environment and "SLURM_ARRAY_TASK_ID" in environment:
        job = f"{environment['SLURM_ARRAY_JOB_ID']}_{environment['SLURM_ARRAY_TASK_ID']}"
    return {SLURM_JOB_TAG: job, SLURM_RESTARTS_TAG: environment.get("SLURM_RESTART_COUNT", "0")}


@dataclass
class RunningRun:
    """A RUNNING run, and whether its process is gone (``stale``) and why (``reason``)."""

    run_id: str
    experiment: str
    name: str
    stale: bool
    reason: str
    last_seen: datetime  # the heartbeat, else the start time


def find_runs(store: RunStore, experiments: Sequence[str] | None = None,
              stale_after: timedelta = STALE_AFTER) -> list[RunningRun]:
    """Every RUNNING run of ``experiments`` (names; ``None`` = all; ConfigError for an unknown one), oldest
    first, judged live or stale (module docstring)."""
    ids = store.experiment_ids(experiments)
    if not ids:
        return []
    names = {e.experiment_id: e.name for e in store.client.search_experiments()}
    runs = store.client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=50_000,
                                    order_by=["attributes.start_time ASC"])
    return [judge(run, names[run.info.experiment_id], stale_after) for run in runs]


def judge(run: Run, experiment: str, stale_after: timedelta) -> RunningRun:
    tags = run.data.tags
    heartbeat = tags.get(HEARTBEAT_TAG)
    last_seen = (datetime.fromisoformat(heartbeat) if heartbeat
                 else datetime.fromtimestamp(run.info.start_time / 1000, UTC))
    silence = datetime.now(UTC) - last_seen
    host, pid = tags.get(HOST_TAG), tags.get(PID_TAG)
    if host == socket.gethostname() and pid:
        stale = not process_exists(int(pid))
        reason = f"process {pid} on {host} is {'gone' if stale else 'running'}"
    else:
        stale = silence > stale_after
        where = f" (host {host})" if host else " (no host recorded)"
        reason = f"last heartbeat {minutes(silence)} ago{where}" if heartbeat else \
                 f"started {minutes(silence)} ago, no heartbeat{where}"
    return RunningRun(run.info.run_id, experiment, run.info.run_name, stale, reason, last_seen)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def minutes(span: timedelta) -> str:
    total = int(span.total_seconds() // 60)
    return f"{total} min" if total < 120 else f"{total // 60} h {total % 60} min"


def mark_killed(client: MlflowClient, runs: Sequence[RunningRun]) -> None:
    """Close stale runs as KILLED, ended at their last sign of life, the reason in ``metalab.error`` (a resumed
    run clears it)."""
    for run in runs:
        client.set_tag(run.run_id, "metalab.error", f"stale: {run.reason}; marked KILLED by metalab runs --mark-killed")
        client.set_terminated(run.run_id, "KILLED", end_time=int(run.last_seen.timestamp() * 1000))
