"""Guards that stop a run early and clearly: divergence, unreachable tracking, interrupts."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import OnExceptionCheckpoint

from metalab.errors import ConfigError


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


def require_reachable(tracking_uri: str, timeout: float = 3.0) -> None:
    """Fail in seconds, before training, when the tracking store cannot be reached or written."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            problem = str(getattr(error, "reason", error))
        raise ConfigError(f"MLflow tracking server {tracking_uri} does not answer ({problem}): start it, or set "
                          "MLFLOW_TRACKING_URI / tracking.tracking_uri to a reachable store, or use tracking=none")
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve().parent
        if not folder.is_dir() or not _writable(folder):
            raise ConfigError(f"tracking.tracking_uri={tracking_uri}: folder {folder} does not exist or is not "
                              "writable: choose another path")


def _writable(folder: Path) -> bool:
    probe = folder / ".metalab-write-probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError:
        return False
    return True
