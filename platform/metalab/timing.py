"""Where a run's wall time goes: start-up, meta-training, validation, test.

Recorded on every run (MLflow metrics ``time/*_s``) and printed in the run's last lines, so a researcher
sees what a slow run spent its time on, and ``benchmarks/meta_training.py`` reads the same figures from
whole ``metalab-train`` processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

STARTUP, META_TRAIN, VALIDATION, TEST = "time/startup_s", "time/meta_train_s", "time/validation_s", "time/test_s"


@dataclass
class Phases:
    """Seconds per phase: ``startup`` (process start → training starts: imports, compose, data, tracking
    run), ``meta_train`` (training steps, the ``auto`` probe and checkpoints, without validation),
    ``validation`` (every validation), ``test``, and the meta-iterations taken."""

    startup: float = 0.0
    meta_train: float = 0.0
    validation: float = 0.0
    test: float = 0.0
    steps: int = 0

    @property
    def total(self) -> float:
        return self.startup + self.meta_train + self.validation + self.test

    def metrics(self) -> dict[str, float]:
        return {STARTUP: self.startup, META_TRAIN: self.meta_train, VALIDATION: self.validation, TEST: self.test}

    def describe(self) -> str:
        """``31.2 s: start-up 6.1 s, meta-training 20.3 s (246 it/s), validation 2.9 s, test 1.9 s``."""
        rate = f" ({self.steps / self.meta_train:.0f} it/s)" if self.steps and self.meta_train > 0 else ""
        return (f"{self.total:.1f} s: start-up {self.startup:.1f} s, meta-training {self.meta_train:.1f} s{rate}, "
                f"validation {self.validation:.1f} s, test {self.test:.1f} s")


class PhaseTimer(Callback):
    """Times the phases of :class:`Phases` with Lightning's hooks; logs them once the test ends."""

    def __init__(self) -> None:
        self.phases = Phases()
        self._fit_start = self._validation_start = self._test_start = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._first_step = trainer.global_step  # a resumed run counts its own steps
        self.phases.startup = time.time() - psutil.Process().create_time()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.phases.validation += time.perf_counter() - self._validation_start

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit = time.perf_counter() - self._fit_start
        self.phases.meta_train = fit - self.phases.validation
        self.phases.steps = trainer.global_step - self._first_step

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test_start = time.perf_counter()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.phases.test = time.perf_counter() - self._test_start
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.phases.metrics(), step=trainer.global_step)
