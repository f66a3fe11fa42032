"""A Hydra multirun as one MLflow parent run, every job's run nested under it (``metalab.sweep`` wires it to Hydra).

:func:`open_sweep` creates the parent run and writes :data:`SWEEP_FILE` into the sweep folder. Each job, in
whatever process or machine the launcher runs it (basic, joblib, SLURM), finds it with :func:`current_sweep`
and tags its run with ``mlflow.parentRunId`` and ``metalab.sweep_id`` (MLflow's own nesting does not
span processes). :func:`close_sweep` counts the jobs on the parent and records an optimiser's best trial.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from metalab.tracking.client import experiment_id, fit_tags, open_client, source_tags
from metalab.tracking.uri import require_reachable

SWEEP_FILE = "metalab_sweep.json"
DEFAULT_EXPERIMENT = "sweeps"
LABEL_LENGTH = 100  # of a job's swept values in its run name (MLflow stores up to 250 characters)


@dataclass
class Sweep:
    sweep_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    swept: list[str] = field(default_factory=list)  # the keys the sweep varies (see swept_keys)

    @classmethod
    def read(cls, folder: Path) -> Sweep | None:
        """The sweep opened in ``folder``, or ``None`` if none was (e.g. with ``tracking=none``)."""
        path = folder / SWEEP_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def current_sweep() -> Sweep | None:
    """The sweep this job belongs to, or ``None`` outside a tracked multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Sweep.read(Path(HydraConfig.get().sweep.dir))


def swept_keys(overrides: Sequence[str], search_space: Iterable[str] = ()) -> list[str]:
    """The keys a multirun varies: the command line's sweeps (``seed=0,1``) and a search sweeper's ``params``."""
    swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))
             if o.is_sweep_override()]
    return swept + [key for key in search_space if key not in swept]


def job_label(sweep: Sweep | None, skip: Collection[str] = ()) -> str:
    """``seed=1-#3``: this job's values of the swept keys (but ``skip``) and its number, for its run name.

    The number alone keeps the names of a sweep's jobs distinct; the values make them readable.
    """
    job = HydraConfig.get()
    swept = set(sweep.swept if sweep else ()) - set(skip)
    values = [f"{o.key_or_group}={_short(o.value())}"
              for o in OverridesParser.create().parse_overrides(list(job.overrides.task)) if o.key_or_group in swept]
    label = "-".join(values)
    if len(label) > LABEL_LENGTH:
        label = label[:LABEL_LENGTH - 1] + "…"
    number = OmegaConf.select(job, "sweeper.trial", default=None)  # an Optuna trial's number: unique in its study,
    if number is None:                                               # over all the workers that share it
        number = OmegaConf.select(job, "job.num", default=None)  # unset where a job is composed outside a launcher
    parts = [label] if label else []
    return "-".join([*parts, f"#{number}"] if number is not None else parts) or "job"


def _short(value: Any) -> str:
    """A search's float as 4 significant digits (``0.01234``), anything else as written."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def open_sweep(folder: Path, tracking_uri: str, experiment_name: str | None = None,
               tags: Mapping[str, str] | None = None, swept: Sequence[str] = ()) -> Sweep:
    """Create the parent run in ``experiment_name`` (default :data:`DEFAULT_EXPERIMENT`) and write
    :data:`SWEEP_FILE` into ``folder`` so that the jobs find it."""
    require_reachable(tracking_uri)  # before MLflow creates a missing folder or fails on an unknown scheme
    client = open_client(tracking_uri)
    experiment = experiment_id(client, experiment_name or DEFAULT_EXPERIMENT)
    sweep_id = f"sweep-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    run = client.create_run(experiment, run_name=sweep_id, tags=fit_tags(
        {"metalab.sweep_id": sweep_id, "metalab.sweep_parent": "true", **(tags or {}), **source_tags()}))
    sweep = Sweep(sweep_id, run.info.run_id, experiment, tracking_uri, list(swept))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_FILE).write_text(json.dumps(asdict(sweep)))
    return sweep


def join_sweep(folder: Path, sweep: Sweep) -> None:
    """Nest this multirun's jobs under ``sweep``'s parent run, opened by another worker (a shared Optuna study):
    write :data:`SWEEP_FILE` into ``folder`` and mark the parent RUNNING again if it had been closed."""
    require_reachable(sweep.tracking_uri)
    client = open_client(sweep.tracking_uri)
    if client.get_run(sweep.parent_run_id).info.status != "RUNNING":
        client.update_run(sweep.parent_run_id, status="RUNNING")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_FILE).write_text(json.dumps(asdict(sweep)))


def close_sweep(sweep: Sweep, best_params: Mapping[str, Any] | None = None, best_value: float | None = None,
                files: Sequence[Path] = (), status: str | None = "FINISHED") -> dict[str, int]:
    """Count the jobs' end states on the parent run (``sweep/jobs*``; a pruned trial's run is KILLED and counted
    in ``sweep/jobs_pruned`` too), record the best trial of a search (params ``best.<key>``, metric
    ``sweep/best_value``) and ``files``, and close the parent with ``status`` (``FAILED``: the sweep itself stopped
    early; ``None``: leave it open, as other workers of its study still run trials); return the counts."""
    client = MlflowClient(sweep.tracking_uri)
    runs = client.search_runs([sweep.experiment_id], f"tags.`metalab.sweep_id` = '{sweep.sweep_id}'",
                              max_results=10_000)
    jobs = [run for run in runs if run.info.run_id != sweep.parent_run_id]
    statuses = [run.info.status for run in jobs]
    counts = {"sweep/jobs": len(statuses), "sweep/jobs_finished": statuses.count("FINISHED"),
              "sweep/jobs_failed": statuses.count("FAILED"), "sweep/jobs_killed": statuses.count("KILLED"),
              "sweep/jobs_pruned": sum(run.data.tags.get("metalab.pruned") == "true" for run in jobs)}
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in counts.items()]
    if best_value is not None:
        metrics.append(Metric("sweep/best_value", float(best_value), now, 0))
    # MLflow's params cannot change: a study that goes on later keeps its first best.* (and its later best trial in
    # the logged optimization_results.yaml and in the tag metalab.best_params).
    logged = client.get_run(sweep.parent_run_id).data.params
    params = [Param(f"best.{key}", str(value)) for key, value in (best_params or {}).items()
              if status is not None and f"best.{key}" not in logged]
    client.log_batch(sweep.parent_run_id, metrics=metrics, params=params)
    if best_params:
        client.set_tag(sweep.parent_run_id, "metalab.best_params", json.dumps(dict(best_params)))
    for file in files:
        client.log_artifact(sweep.parent_run_id, str(file))
    if status is not None:
        client.set_terminated(sweep.parent_run_id, status)
    return counts
