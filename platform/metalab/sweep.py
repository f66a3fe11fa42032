"""Sweeps in MLflow: one parent run per Hydra multirun, every job's run nested under it.

A Hydra callback (``hydra.callbacks.mlflow_sweep`` in ``conf/config.yaml``) opens the parent run when
the multirun starts and writes ``metalab_sweep.json`` into the sweep folder. Each job, in whatever
process or machine the launcher runs it (basic, joblib, SLURM), reads that file and tags its run with
``mlflow.parentRunId`` and ``metalab.sweep_id``, so the MLflow UI nests them. When the multirun ends
the callback counts finished and failed jobs on the parent, and records the best trial of an Optuna
search (Hydra's ``optimization_results.yaml``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

SWEEP_FILE = "metalab_sweep.json"
DEFAULT_EXPERIMENT = "sweeps"


@dataclass
class Sweep:
    sweep_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str


def current_sweep() -> Sweep | None:
    """The sweep this job belongs to, or ``None`` outside a tracked multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    path = Path(HydraConfig.get().sweep.dir) / SWEEP_FILE
    return Sweep(**json.loads(path.read_text())) if path.exists() else None


def _tracked(config: DictConfig) -> bool:
    return str(config.get("tracking", {}).get("_target_", "")).endswith("MLflowTracking")


class MLflowSweepCallback(Callback):
    """Opens and closes the parent run of a multirun (no-op with ``tracking=none``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _tracked(config):
            return
        from metalab.tracking.mlflow_tracking import source_tags

        uri = config.tracking.tracking_uri
        client = MlflowClient(uri)
        name = config.tracking.experiment_name or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        sweep_id = f"sweep-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(experiment_id, run_name=sweep_id,
                                tags={"metalab.sweep_id": sweep_id, "metalab.sweep_parent": "true",
                                      "metalab.sweep_overrides": overrides[:5000],
                                      "metalab.sweeper": str(config.hydra.sweeper._target_), **source_tags()})
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SWEEP_FILE).write_text(json.dumps(asdict(Sweep(sweep_id, run.info.run_id, experiment_id, uri))))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / SWEEP_FILE
        if not _tracked(config) or not path.exists():
            return
        sweep = Sweep(**json.loads(path.read_text()))
        client = MlflowClient(sweep.tracking_uri)
        runs = client.search_runs([sweep.experiment_id], f"tags.`metalab.sweep_id` = '{sweep.sweep_id}'",
                                  max_results=10_000)
        statuses = [run.info.status for run in runs if run.info.run_id != sweep.parent_run_id]
        for key, value in {"sweep/jobs": len(statuses), "sweep/jobs_finished": statuses.count("FINISHED"),
                           "sweep/jobs_failed": statuses.count("FAILED"),
                           "sweep/jobs_killed": statuses.count("KILLED")}.items():
            client.log_metric(sweep.parent_run_id, key, value)
        results = Path(config.hydra.sweep.dir) / "optimization_results.yaml"
        if results.exists():  # written by the Optuna sweeper
            best = yaml.safe_load(results.read_text())
            for key, value in (best.get("best_params") or {}).items():
                client.log_param(sweep.parent_run_id, f"best.{key}", value)
            if best.get("best_value") is not None:
                client.log_metric(sweep.parent_run_id, "sweep/best_value", float(best["best_value"]))
            client.log_artifact(sweep.parent_run_id, str(results))
        client.set_terminated(sweep.parent_run_id, "FINISHED")
