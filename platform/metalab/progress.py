"""The progress bar of ``metalab-train``: meta-iterations done out of ``trainer.max_steps``, with the train loss
and the last validation's post-adaptation metric.

Lightning's own bar counts batches of an epoch; metalab's training stream is one endless epoch, so it read
``Epoch 0/-2``. This one counts ``global_step`` (a resumed run starts where it stopped) and names the meta-val
and meta-test passes. train.py's ``make_trainer`` installs it when ``trainer.enable_progress_bar`` is true.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress.rich_progress import (
    BatchesProcessedColumn,
    CustomBarColumn,
    CustomTimeColumn,
    RichProgressBarTheme,
)
from rich.progress import ProgressColumn, Task, TextColumn
from rich.text import Text

TRAIN_LOSSES = ("meta_train/loss", "pretrain/loss")  # the first one logged is shown (pretrain: algorithm=finetune)
REDRAW_SECONDS = 0.1  # the training bar's count and metrics change at most 10 times a second
VALIDATION_METRICS = ("meta_val/post_acc", "meta_val/post_loss")  # the first one logged is shown


class MetaProgressBar(RichProgressBar):
    """``meta-train ━━━━━━ 1200/5000 0:00:07 • 0:00:22 170.1it/s train loss: 0.512 val post_loss: 0.4301``.

    The metrics are the values MLflow records: the train loss every ``trainer.log_every_n_steps``, the
    validation's every ``trainer.val_check_interval`` (absent until they are first logged).
    """

    def __init__(self) -> None:
        # Without a terminal (a log file, a captured run) rich assumes 80 columns and wraps the metrics.
        super().__init__(theme=RichProgressBarTheme(metrics_format=".4g"),
                         console_kwargs=None if sys.stdout.isatty() else {"width": 120})
        self._last_redraw = -math.inf

    def configure_columns(self, trainer: pl.Trainer) -> list[ProgressColumn]:
        """Lightning's columns, with a shorter bar (room for the metrics) and no speed before there is one."""
        return [TextColumn("[progress.description]{task.description}"),
                CustomBarColumn(bar_width=24, complete_style=self.theme.progress_bar,
                                finished_style=self.theme.progress_bar_finished,
                                pulse_style=self.theme.progress_bar_pulse),
                BatchesProcessedColumn(style=self.theme.batch_progress),
                CustomTimeColumn(style=self.theme.time),
                _Speed(style=self.theme.processing_speed)]

    @property
    def validation_description(self) -> str:
        return "meta-val"

    @property
    def test_description(self) -> str:
        return "meta-test"

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps > 0 else math.inf

    def _get_train_description(self, current_epoch: int) -> str:
        # One endless epoch: its number says nothing. A non-episodic algorithm (finetune) pre-trains.
        algorithm = getattr(self.trainer.lightning_module, "algorithm", None)
        return "meta-train" if getattr(algorithm, "episodic", True) else "pre-train"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:  # a resumed run starts at its step
            self.progress.reset(self.train_progress_bar_id, total=self.total_train_batches,
                                completed=trainer.global_step, description=self._get_train_description(0))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Throttled: a sinusoid meta-iteration takes milliseconds, and updating rich's task every step (its lock,
        its speed samples) cost a measurable share of it; the last step is always drawn."""
        now = time.perf_counter()
        last = 0 <= trainer.max_steps <= trainer.global_step
        if now - self._last_redraw < REDRAW_SECONDS and not last:
            return
        self._last_redraw = now
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)  # and (soft) refresh
        self._update_metrics(trainer, pl_module)  # reads the loss (a GPU sync) at most at the redraw rate

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        logged = trainer.callback_metrics
        shown: dict[str, Any] = {}
        for name in TRAIN_LOSSES:
            if name in logged:
                shown["train loss"] = logged[name].item()
                break
        for name in VALIDATION_METRICS:
            if name in logged:
                shown[f"val {name.split('/')[1]}"] = logged[name].item()
                break
        # No v_num (the MLflow run id's tail); whatever a module logs with prog_bar=True still shows.
        return shown | {name: value.item() if hasattr(value, "item") else value
                        for name, value in trainer.progress_bar_metrics.items()}


class _Speed(ProgressColumn):
    """Iterations per second, blank until measured (Lightning's column reads 0.00it/s after one batch)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.1f}it/s", style=self.style)
