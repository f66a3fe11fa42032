"""Sweeps in MLflow: one parent run per Hydra multirun, every job's run nested under it.

A Hydra callback (``hydra.callbacks.mlflow_sweep`` in ``conf/config.yaml``) opens the parent run when
the multirun starts (:func:`metalab.tracking.sweeps.open_sweep`, which tells each job, in whatever process
or machine the launcher runs it, where its parent is). When the multirun ends the callback counts finished
and failed jobs on the parent, and records the best trial of an Optuna search (Hydra's
``optimization_results.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metalab.errors import ConfigError
from metalab.tracking.sweeps import Sweep, close_sweep, open_sweep, swept_keys


def _tracked(config: DictConfig) -> bool:
    return str(config.get("tracking", {}).get("_target_", "")).endswith("MLflowTracking")


class MLflowSweepCallback(Callback):
    """Opens and closes the parent run of a multirun (no-op with ``tracking=none``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _tracked(config):
            return
        try:
            open_sweep(Path(config.hydra.sweep.dir), config.tracking.tracking_uri, config.tracking.experiment_name,
                       tags={"metalab.sweep_overrides": " ".join(config.hydra.overrides.task),
                             "metalab.sweeper": str(config.hydra.sweeper._target_)},
                       swept=swept_keys(config.hydra.overrides.task, config.hydra.sweeper.get("params") or {}))
        except ConfigError as error:  # Hydra would make it a warning and run every job into the same error
            print(f"metalab: error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        sweep = Sweep.read(folder) if _tracked(config) else None
        if sweep is None:
            return
        results = folder / "optimization_results.yaml"
        if not results.exists():  # written by the Optuna sweeper only
            close_sweep(sweep)
            return
        best = yaml.safe_load(results.read_text())
        close_sweep(sweep, best.get("best_params"), best.get("best_value"), files=[results])


class PlainOptunaLogs(Callback):
    """Optuna logs through its own colorlog handler, colour codes and all, even into redirected output and log
    files. In an Optuna search its lines go through Python's logging instead: Hydra's handlers, plain text."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" not in str(config.hydra.sweeper.get("_target_", "")):
            return  # `import optuna` only where it is the sweeper
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
