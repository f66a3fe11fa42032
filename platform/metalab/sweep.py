"""Sweeps in MLflow: one parent run per Hydra multirun, every job's run nested under it.

A Hydra callback (``hydra.callbacks.mlflow_sweep`` in ``conf/config.yaml``) opens the parent run when
the multirun starts (:func:`metalab.tracking.sweeps.open_sweep`, which tells each job, in whatever process
or machine the launcher runs it, where its parent is; the workers of one Optuna study share one parent,
:func:`study_sweep`) and prints the sweep's id with the command that compares its runs. When the multirun
ends the callback counts finished and failed jobs on the parent, records the best trial of an Optuna search
(``optimization_results.yaml``) and closes the parent FINISHED; if the sweep itself dies first (Hydra calls
no callback then), the parent is closed FAILED at exit.

A failed job of a search (:func:`searching`) is a failed trial: :func:`job_failed` raises, as Optuna expects
of an objective that fails, and the search goes on (``hydra.sweeper.max_failure_rate``).
"""

from __future__ import annotations

import atexit
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from metalab.errors import ConfigError, one_line
from metalab.search.study import SWEEPER, join_study, study_place
from metalab.search.sweeper import RESULTS, check_settings
from metalab.tracking.sweeps import Sweep, close_sweep, join_sweep, open_sweep, swept_keys
from metalab.tracking.uri import default_tracking_uri

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
PARENT_ATTR = "metalab.sweep"  # the study's user attribute holding its parent run (a Sweep, as a dict)
PARENT_WAIT_S = 60.0  # how long a joining worker waits for the first to record the parent


class TrialFailed(RuntimeError):
    """A job of a search failed or gave no objective: its sweeper records a failed trial."""


def searching() -> bool:
    """Whether this job is a trial of a search: a multirun whose sweeper reads the jobs' returns (Optuna,
    any sweeper but Hydra's basic one)."""
    if not HydraConfig.initialized():
        return False
    hydra = HydraConfig.get()
    return hydra.mode == RunMode.MULTIRUN and hydra.sweeper.get("_target_", BASIC_SWEEPER) != BASIC_SWEEPER


def job_failed(error: BaseException) -> float:
    """What a multirun's job returns once it failed (its run FAILED, its error printed): a search's sweeper
    records a job that raises as a failed trial and goes on; Hydra's basic sweeper would stop at it, so it
    gets NaN, which it ignores."""
    if searching():
        raise TrialFailed(one_line(error)) from None
    return float("nan")


def check_objective(objective: str, metrics: Mapping[str, float]) -> None:
    """In a search, a run whose objective is missing or not finite fails: the sweeper cannot rank it."""
    if not searching():
        return
    if objective not in metrics:
        raise ConfigError(f"objective={objective} was not logged by this run (it logged "
                          f"{', '.join(sorted(metrics))}): set objective= to one of them")
    if not math.isfinite(metrics[objective]):
        raise TrialFailed(f"objective {objective} is {metrics[objective]}: the trial cannot be ranked")


def _tracked(config: DictConfig) -> bool:
    return str(config.get("tracking", {}).get("_target_", "")).endswith("MLflowTracking")


def compare_command(sweep: Sweep) -> str:
    """The exact ``metalab compare`` command for ``sweep``'s runs."""
    store = "" if sweep.tracking_uri == default_tracking_uri() else f" --tracking-uri {sweep.tracking_uri}"
    return f"metalab compare --sweep {sweep.sweep_id}{store}"


class MLflowSweepCallback(Callback):
    """Opens and closes the parent run of a multirun (no-op with ``tracking=none``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            if config.hydra.sweeper.get("_target_") == SWEEPER:
                check_settings(config.hydra.sweeper)
        except ConfigError as error:
            print(f"metalab: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        if not _tracked(config):
            return
        try:
            if config.hydra.sweeper.get("_target_") == SWEEPER:
                sweep = study_sweep(config)
            else:
                sweep = open_parent(config)
        except ConfigError as error:  # Hydra would make it a warning and run every job into the same error
            print(f"metalab: error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        atexit.register(_close_abandoned, sweep)
        print(f"sweep {sweep.sweep_id}: its runs nest under one MLflow parent run; compare them with: "
              f"{compare_command(sweep)}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        sweep = Sweep.read(folder) if _tracked(config) else None
        if sweep is None:
            return
        atexit.unregister(_close_abandoned)
        results = folder / RESULTS
        if results.exists():  # written by the Optuna sweeper only
            best = yaml.safe_load(results.read_text())
            running = best.get("trials", {}).get("running", 0)  # other workers' trials of a shared study
            counts = close_sweep(sweep, best.get("best_params"), best.get("best_value"), files=[results],
                                 status=None if running else "FINISHED")
            if running:
                print(f"sweep {sweep.sweep_id}: this worker is done; {running} trials of study {best['name']} still "
                      "run in other workers, so its parent run stays open until the last one ends", flush=True)
                return
        else:
            counts = close_sweep(sweep)
        print(f"sweep {sweep.sweep_id} done: {counts['sweep/jobs']} jobs, {counts['sweep/jobs_finished']} finished, "
              f"{counts['sweep/jobs_failed']} failed{_pruned(counts)}; compare them with: {compare_command(sweep)}",
              flush=True)


def _pruned(counts: dict[str, int]) -> str:
    return f", {counts['sweep/jobs_pruned']} pruned" if counts.get("sweep/jobs_pruned") else ""


def open_parent(config: DictConfig, tags: dict[str, str] | None = None) -> Sweep:
    """A new parent run for this multirun."""
    return open_sweep(Path(config.hydra.sweep.dir), config.tracking.tracking_uri, config.tracking.experiment_name,
                      tags={"metalab.sweep_overrides": " ".join(config.hydra.overrides.task),
                            "metalab.sweeper": str(config.hydra.sweeper._target_), **(tags or {})},
                      swept=swept_keys(config.hydra.overrides.task, config.hydra.sweeper.get("params") or {}))


def study_sweep(config: DictConfig) -> Sweep:
    """The parent run of an Optuna study: one for all the workers that share the study.

    The worker that creates the study opens the parent and records it in the study (a user attribute); a worker
    that joins reads it there (waiting for the first to write it) and nests its jobs under it too.
    """
    place = study_place(config.hydra.sweeper, Path(config.hydra.sweep.dir))
    study, created = join_study(place, str(config.hydra.sweeper.direction))
    recorded = None if created else wait_for(lambda: study.user_attrs.get(PARENT_ATTR), PARENT_WAIT_S)
    if recorded is None:  # the first worker (or one that died before recording its parent)
        sweep = open_parent(config, {"metalab.optuna_study": place.name, "metalab.optuna_storage": place.shown})
        study.set_user_attr(PARENT_ATTR, asdict(sweep))
        return sweep
    sweep = Sweep(**recorded)
    if sweep.tracking_uri != config.tracking.tracking_uri:
        raise ConfigError(f"tracking.tracking_uri={config.tracking.tracking_uri}, but study {place.name}'s parent run "
                          f"is in {sweep.tracking_uri}: give every worker of the study the same tracking URI")
    join_sweep(Path(config.hydra.sweep.dir), sweep)
    return sweep


def wait_for(read: Callable[[], Any], seconds: float) -> Any:
    """``read()``'s first value that is not ``None``, polling for at most ``seconds``; else ``None``."""
    deadline = time.monotonic() + seconds
    while (value := read()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def _close_abandoned(sweep: Sweep) -> None:
    """At exit of a multirun that ended without ``on_multirun_end`` (the sweeper raised, Ctrl-C): parent FAILED."""
    try:
        counts = close_sweep(sweep, status="FAILED")
    except Exception as error:  # at exit: one line, not a traceback over Hydra's report
        print(f"metalab: error: sweep {sweep.sweep_id}'s parent run could not be closed: {one_line(error)}",
              file=sys.stderr)
        return
    print(f"sweep {sweep.sweep_id} stopped before its end (parent run FAILED): {counts['sweep/jobs']} jobs, "
          f"{counts['sweep/jobs_finished']} finished, {counts['sweep/jobs_failed']} failed", file=sys.stderr)


class PlainOptunaLogs(Callback):
    """Optuna logs through its own colorlog handler, colour codes and all, even into redirected output and log
    files. In an Optuna search its lines go through Python's logging instead: Hydra's handlers, plain text."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" not in str(config.hydra.sweeper.get("_target_", "")):
            return  # `import optuna` only where it is the sweeper
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
