"""Guards that stop a run early and clearly: divergence, interrupts, termination (an unreachable tracking store:
``metalab.tracking.uri.require_reachable``; a run whose process died: ``metalab.tracking.liveness``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: SLURM and submitit see a job that was stopped,
# not one that finished (Lightning's own SIGTERM exit is status 0).
TERMINATED_EXIT_CODE = 143
LAST = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt"  # what resume= continues from


class DivergenceError(RuntimeError):
    """The meta-training loss, or a weight saved in a checkpoint, became NaN or infinite."""


def requeue_signal() -> signal.Signals:
    """The signal submitit's SLURM jobs get ``signal_delay_s`` before their time limit (``sbatch
    --signal=USR2@<s>``), which its handler answers by requeueing the job: ``SUBMITIT_PREEMPT_SIGNAL``, as submitit
    reads it (default USR2)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


class Terminated(SystemExit):
    """The job got SIGTERM (SLURM preemption, ``scancel``, ``kill``), or submitit's time-limit signal, and stopped
    after a meta-iteration.

    Exits with :data:`TERMINATED_EXIT_CODE`; ``str()`` says at which step and where the checkpoint is. After the
    time-limit signal, :meth:`requeue` hands the job to submitit's handler, which requeues it and exits."""

    def __init__(self, message: str, requeue: Callable[[], None] | None = None) -> None:
        super().__init__(TERMINATED_EXIT_CODE)
        self.message = message
        self._requeue = requeue

    def __str__(self) -> str:
        return self.message

    def requeue(self) -> None:
        """After submitit's time-limit signal, run its handler, held until the checkpoint was saved: it requeues
        the job (``scontrol requeue``) and exits, or raises where ``max_num_timeout`` is used up. Else nothing."""
        if self._requeue is not None:
            self._requeue()

    @classmethod
    def after(cls, trainer: pl.Trainer, run_id: str | None) -> Terminated:
        """What Lightning's SIGTERMException left: the step, and the checkpoint to continue from (the one
        :class:`InterruptCheckpoint` took, or after training the final ``last.ckpt``)."""
        interrupt = next((c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint)), None)
        saved = interrupt.saved if interrupt is not None else None
        callback = trainer.checkpoint_callback
        final = Path(callback.dirpath, LAST) if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
        if saved is None and final is not None and final.is_file():
            saved = str(final)
        where = (f"checkpoint {saved}" + (f"; continue with resume={run_id}" if run_id else "")
                 if saved else "no checkpoint to continue from")
        if interrupt is not None and interrupt.requeue is not None:
            return cls(f"{requeue_signal().name} at step {trainer.global_step} (SLURM's time limit is near; submitit "
                       f"requeues the job and resume=auto goes on): {where}", interrupt.requeue)
        return cls(f"SIGTERM at step {trainer.global_step} (preemption, scancel or kill): {where}")


class InterruptCheckpoint(Checkpoint):
    """Save the state at an interrupt, beside the other checkpoints, so nothing trained is lost.

    - Ctrl-C (SIGINT): ``interrupted.ckpt``, after the current batch (see below); a second Ctrl-C stops anywhere
      in a step (mid-update, say), so it is kept apart from ``last.ckpt``, which ``resume=`` continues from.
    - SIGTERM (what SLURM sends on preemption): ``last.ckpt``, so ``resume=`` (and ``resume=auto`` in a
      requeued job) continues from the signal's step. Lightning's signal handler only sets a flag; its loops
      raise SIGTERMException after the meta-iteration, so the state is whole. A validation under way is
      finished first: Lightning would stop it after its current batch and, resumed, not redo it (that step's
      ``meta_val/*`` would be missing); the state is saved at once all the same, in case the grace time
      (SLURM's ``KillWait``) ends before the validation does.
    - submitit's time-limit signal (:func:`requeue_signal`, USR2, ``signal_delay_s`` before SLURM's time limit):
      as SIGTERM. Left to itself, submitit's handler requeues the job and exits wherever training is, and what
      was trained since the last periodic checkpoint would be lost; during training it is held until
      ``last.ckpt`` is saved, then run (:meth:`Terminated.requeue`). Outside training (start-up, testing)
      nothing is lost and submitit's handler runs as it comes.

    Only interrupts: after a divergence the weights may be NaN, and the newest checkpoint (weights checked
    finite when written, :func:`non_finite`) must stay the last good state.

    While the trainer runs, a first Ctrl-C is held until the current batch ends, then raised there (a second
    one raises at once). Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives; inside
    a finaliser or a garbage-collector callback it is printed as "Exception ignored" and lost, and a run once
    trained on for 27 minutes after Ctrl-C. Raised from a batch's end, it always reaches Lightning's handler.

    Not Lightning's ``OnExceptionCheckpoint``: with one of those, ``fit(ckpt_path=None)`` means "continue from
    the newest checkpoint in the folder" (and warns on every fresh run that there is none). A run continues
    only when asked (``resume=``), from the checkpoint train.py passes.
    """

    def __init__(self, dirpath: Path) -> None:
        self.ckpt_path = str(Path(dirpath) / "interrupted.ckpt")
        self.last_path = str(Path(dirpath) / LAST)
        self.saved: str | None = None  # the checkpoint the SIGTERM left
        self.requeue: Callable[[], None] | None = None  # submitit's handler, held: its time-limit signal came
        self._submitit_handler: Any = None  # the handler of requeue_signal() while training (None: not installed)
        self._held_sigterm = False  # a SIGTERM kept from Lightning until the validation ends
        self._ctrl_c = False  # a Ctrl-C held until the current batch ends
        self._previous_sigint: Any = None  # the SIGINT handler before setup (None: not installed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread() and self._previous_sigint is None:
            self._ctrl_c = False
            self._previous_sigint = signal.signal(signal.SIGINT, self._hold_ctrl_c)

    def _hold_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        if self._ctrl_c:  # the second Ctrl-C: at once
            raise KeyboardInterrupt
        self._ctrl_c = True
        print("\nmetalab: Ctrl-C: stopping after this batch (Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        handler = signal.getsignal(requeue_signal())  # submitit's, in a job it runs
        if threading.current_thread() is threading.main_thread() and callable(handler):
            self.requeue, self._submitit_handler = None, handler
            signal.signal(requeue_signal(), lambda signum, frame: self._hold_requeue(trainer, signum, frame))

    def _hold_requeue(self, trainer: pl.Trainer, signum: int, frame: FrameType | None) -> None:
        handler = self._submitit_handler
        self.requeue = lambda: handler(signum, frame)
        trainer._signal_connector.received_sigterm = True  # Lightning stops after the meta-iteration, as on SIGTERM

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_submitit_handler()
        if self.requeue is not None:  # it came in the last meta-iteration, whose checkpoint is saved: testing could
            self.requeue()            # outlast the time limit, so requeue now; the resumed job tests

    def _restore_submitit_handler(self) -> None:
        if self._submitit_handler is not None:
            signal.signal(requeue_signal(), self._submitit_handler)
            self._submitit_handler = None

    def _raise_held_ctrl_c(self) -> None:
        if self._ctrl_c:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._raise_held_ctrl_c()

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._raise_held_ctrl_c()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._raise_held_ctrl_c()
        if trainer.received_sigterm and trainer.state.fn == TrainerFn.FITTING and not self._held_sigterm:
            self._save_last(trainer)
            trainer._signal_connector.received_sigterm = False  # Lightning's loops read this flag after each batch
            self._held_sigterm = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._held_sigterm:
            trainer._signal_connector.received_sigterm = True  # Lightning stops after this meta-iteration
            self._held_sigterm = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception. After Ctrl-C it ignores SIGINT while it shuts down:
        # leave that; after anything else, Ctrl-C is Python's again.
        if isinstance(exception, KeyboardInterrupt):
            self._previous_sigint = None
        else:
            self._restore_sigint()
        self._restore_submitit_handler()
        self._ctrl_c = False
        if isinstance(exception, KeyboardInterrupt):
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        elif isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:  # testing: it is final
            self._save_last(trainer)

    def _save_last(self, trainer: pl.Trainer) -> None:
        loop = trainer.fit_loop.epoch_loop
        # After a meta-iteration's end, Lightning has counted its logging step; a checkpoint saved at a validation's
        # end has not (and resuming adds it, see validation.ValidateAtEnd): save it as one of those, so a resumed
        # run logs its next step at the right index.
        counted = not trainer.validating
        loop._batches_that_stepped -= counted
        try:
            trainer.save_checkpoint(self.last_path, weights_only=False)
        finally:
            loop._batches_that_stepped += counted
        self.saved = self.last_path
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and Path(callback.dirpath or "", LAST) == Path(self.last_path):
                callback.last_model_path = self.last_path  # its own: else it would save its next one as last-v1.ckpt

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A run that ends normally (a resumed one too) leaves no stale ``interrupted.ckpt``; Ctrl-C is Python's
        again."""
        self._restore_sigint()
        self._raise_held_ctrl_c()  # one that came after the last batch
        trainer.strategy.remove_checkpoint(self.ckpt_path)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def non_finite(checkpoint: dict[str, Any]) -> str | None:
    """The name of the first weight, buffer or optimiser state in ``checkpoint`` holding NaN or ±inf; ``None``
    if all are finite (one device sync for the lot)."""
    named = [(name, t) for name, t in _tensors(checkpoint.get("state_dict", {}), "")] + \
            [(name, t) for name, t in _tensors(checkpoint.get("optimizer_states", []), "optimizer state ")]
    named = [(name, t) for name, t in named if t.is_floating_point() or t.is_complex()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    return next((name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok), None)


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix.rstrip("."), value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}{key}.")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}{index}.")


def kept_checkpoint(trainer: pl.Trainer | None) -> str:
    """What a run that diverged leaves to continue from, read from disk: ``the last finite weights are in
    /…/last.ckpt (step 12)`` or ``no checkpoint was saved before it``."""
    callback = trainer.checkpoint_callback if trainer is not None else None
    if not isinstance(callback, ModelCheckpoint):
        return "no checkpoint was saved before it (no checkpoint callback)"
    candidates = [Path(p) for p in (callback.last_model_path, callback.best_model_path) if p]
    if callback.dirpath:
        candidates.insert(0, Path(callback.dirpath) / LAST)  # also when a resumed run has saved none yet
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return "no checkpoint was saved before it"
    step = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"]
    return f"the last finite weights are in {path} (step {step})"
