"""When a run validates: every ``trainer.val_check_interval`` meta-iterations and once more after the last one.

The last validation gives a sweep its objective (``meta_val/*``) and ``last.ckpt`` the final weights
(``ModelCheckpoint`` saves at each validation), however short the run and whatever stopped it.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

MAX_DEFAULT_INTERVAL = 1000
VALIDATIONS = 5  # the default interval spreads this many validations over max_steps


def val_check_interval(max_steps: int, interval: int | None) -> int:
    """``interval`` if set, else ``max_steps``/5 rounded up, at most 1000 (1000 when ``max_steps`` is -1:
    unlimited, a ``max_time`` run)."""
    if interval is not None:
        return interval
    if max_steps < 0:
        return MAX_DEFAULT_INTERVAL
    return min(MAX_DEFAULT_INTERVAL, max(1, math.ceil(max_steps / VALIDATIONS)))


class ValidateAtEnd(Callback):
    """Validate after the last meta-iteration too, unless the interval already falls on it (never twice).

    Lightning validates after a step that sets ``trainer.should_stop`` (as ``max_time``'s Timer does), but
    not after ``max_steps`` unless the interval divides it; the training stream is endless, so there is no
    epoch end either. Setting ``should_stop`` before the last step (not after) also makes the learner log
    that step's training metrics: a stopping step is always a logging step.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Continue the logged steps where a resumed checkpoint left them.

        From a checkpoint saved by a validation, Lightning counts the validated step as logged only if the
        resumed run's interval falls on it too (it then replays the step's end); after a final validation off
        the interval, or with an interval rescaled to a new max_steps, every resumed step would be logged one
        step early, the first over the checkpoint's own.
        """
        loop = trainer.fit_loop.epoch_loop
        if loop.restarted_on_last and loop.batch_progress.total.ready % trainer.val_check_batch != 0:
            loop._batches_that_stepped += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if 0 <= trainer.max_steps <= trainer.global_step + 1:
            trainer.should_stop = True
