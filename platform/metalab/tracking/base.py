"""What train.py needs of a tracking back-end: open a run, hand Lightning a logger, close the run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger

from metalab.errors import ConfigError


@dataclass
class RunInfo:
    """How a job is named and where its local files are; filled by train.py from Hydra's runtime."""

    experiment_name: str
    run_name: str
    output_dir: Path
    choices: dict[str, str]  # config group -> chosen option, e.g. {"algorithm": "maml"}
    overrides: list[str]
    data: dict[str, str] = field(default_factory=dict)  # the task family's data_description(): the run's data


class Tracking(ABC):
    run_id: str | None = None
    logs_models: bool = False  # whether a finished run's learner is saved and logged as an MLflow Model

    @abstractmethod
    def start(self, cfg: DictConfig, info: RunInfo) -> Logger | None:
        """Open the run for this job and record its configuration; return Lightning's logger for it."""

    def describe(self) -> str:
        """Where the open run is recorded, in a line's words (train.py's header)."""
        return type(self).__name__

    def check(self) -> None:  # noqa: B027 (nothing to check is a valid default)
        """Fail in seconds, before training, if runs cannot be recorded (ConfigError)."""

    def locate(self, run_id: str) -> tuple[Path, Path]:
        """Run ``run_id``'s output folder and the checkpoint to continue from (reads only)."""
        raise ConfigError(f"resume={run_id} needs tracking=mlflow (the run and its checkpoint are found there)")

    def resume(self, run_id: str) -> Logger:
        """Reopen run ``run_id`` and return Lightning's logger for it."""
        raise ConfigError(f"resume={run_id} needs tracking=mlflow (the run and its checkpoint are found there)")

    def run_begun_in(self, output_dir: Path) -> str | None:
        """The run a job started in ``output_dir`` before (``resume=auto``), if any."""
        return None

    def ui_page(self) -> str | None:
        """The address of the open run's page in the MLflow UI, if runs are recorded."""
        return None

    def set_tags(self, tags: dict[str, str]) -> None:  # noqa: B027 (recording nothing is a valid default)
        """Add tags to the open run."""

    def log_model(self, folder: Path, metrics: dict[str, float]) -> None:  # noqa: B027 (recording nothing is valid)
        """Log the MLflow Model folder ``folder`` (:mod:`metalab.serving`) to the open run, and register it where
        configured, with ``metrics`` (the run's ``meta_test/*``) as the version's tags."""

    @abstractmethod
    def finish(self, status: str, error: BaseException | None = None) -> None:
        """Close the run as FINISHED, FAILED or KILLED; ``error`` says why it did not finish."""
