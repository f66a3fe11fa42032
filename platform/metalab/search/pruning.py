"""Pruning from the Lightning loop: a trial's job reports its objective after every validation, and stops
when the study's pruner says the trial will not beat the others.

A pruned run is not a failure: its MLflow run ends KILLED, tagged ``metalab.pruned`` (with the step) and its
description (``mlflow.note.content``, the run page's Description) says why; the job raises
:class:`TrialPruned` so that the sweeper records the trial as pruned.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback

from metalab.search.study import SWEEPER


class TrialPruned(Exception):
    """This job's trial was pruned: its run stopped early on purpose (the message says why)."""


@dataclass
class Pruned:
    """Where and why a trial was pruned."""

    step: int
    value: float
    explanation: str


class PruneTrial(Callback):
    """Report ``objective`` to ``trial`` after each validation; stop training when the trial should be pruned."""

    def __init__(self, trial: Any, objective: str, study_name: str) -> None:
        self.trial, self.objective, self.study_name = trial, objective, study_name
        self.pruned: Pruned | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.objective not in trainer.callback_metrics:
            return
        # The step MLflow shows this validation at: Lightning logs it before it counts the step's batch.
        value, step = float(trainer.callback_metrics[self.objective]), max(trainer.global_step - 1, 0)
        prune = False
        if trainer.is_global_zero:
            self.trial.report(value, step)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):  # every process stops at the same step
            self.pruned = Pruned(step, value, self.explain(step, value))
            trainer.should_stop = True

    def explain(self, step: int, value: float) -> str:
        """One paragraph for the run's description: the pruner, the step, this value and the others' there."""
        from optuna.trial import TrialState

        others = [t.intermediate_values[step] for t in self.trial.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)) if step in t.intermediate_values]
        context = (f"; the median of the {len(others)} completed trials there was {statistics.median(others):.6g}"
                   if others else "")
        return (f"Pruned: trial {self.trial.number} of Optuna study {self.study_name} was stopped at step {step} "
                f"by {type(self.trial.study.pruner).__name__}: {self.objective} was {value:.6g}{context}. "
                "It stopped on purpose, so it has no meta_test metrics and no model.")


def trial_pruning(objective: str) -> PruneTrial | None:
    """The pruning callback of this job's trial, or ``None`` outside a search by metalab's Optuna sweeper."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    sweeper = hydra.sweeper
    if sweeper.get("_target_") != SWEEPER or sweeper.get("trial") is None:
        return None
    from metalab.search.study import study_place, trial_of

    place = study_place(sweeper, Path(hydra.sweep.dir))
    pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else None
    return PruneTrial(trial_of(place, int(sweeper.trial), pruner), objective, place.name)
