"""Guards that stop a run early and clearly: divergence, interrupts (an unreachable tracking store:
``metalab.tracking.uri.require_reachable``)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import OnExceptionCheckpoint


class DivergenceError(RuntimeError):
    """The meta-training loss became NaN or infinite."""


class InterruptCheckpoint(OnExceptionCheckpoint):
    """On Ctrl-C (SIGINT), save ``interrupted.ckpt`` beside the others, so nothing trained is lost.

    Only interrupts: after a divergence the weights are NaN, and ``last.ckpt`` (the last good state)
    must stay the newest checkpoint worth resuming from.
    """

    def __init__(self, dirpath: Path) -> None:
        super().__init__(dirpath, filename="interrupted")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            super().on_exception(trainer, pl_module, exception)
