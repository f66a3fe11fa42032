"""Guards that stop a run early and clearly: divergence, interrupts (an unreachable tracking store:
``metalab.tracking.uri.require_reachable``)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint


class DivergenceError(RuntimeError):
    """The meta-training loss became NaN or infinite."""


class InterruptCheckpoint(Checkpoint):
    """On Ctrl-C (SIGINT), save ``interrupted.ckpt`` beside the others, so nothing trained is lost.

    Only interrupts: after a divergence the weights are NaN, and ``last.ckpt`` (the last good state)
    must stay the newest checkpoint worth resuming from.

    Not Lightning's ``OnExceptionCheckpoint``: with one of those, ``fit(ckpt_path=None)`` means "continue from
    the newest checkpoint in the folder" (and warns on every fresh run that there is none). A run continues
    only when asked (``resume=``), from the checkpoint train.py passes.
    """

    def __init__(self, dirpath: Path) -> None:
        self.ckpt_path = str(Path(dirpath) / "interrupted.ckpt")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            trainer.save_checkpoint(self.ckpt_path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A run that ends normally (a resumed one too) leaves no stale ``interrupted.ckpt``."""
        trainer.strategy.remove_checkpoint(self.ckpt_path)
