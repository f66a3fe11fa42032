"""What a run recorded, read back for a resume: its client and its text artifacts (MLflow stays in tracking/)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.tracking import MlflowClient

from metalab.errors import ConfigError
from metalab.tracking.base import Tracking


def run_client(tracking: Tracking) -> MlflowClient:
    """The MLflow client of ``tracking``; one line where the back-end records no runs."""
    client = getattr(tracking, "client", None)
    if not isinstance(client, MlflowClient):  # locate() already refuses a back-end without runs
        raise ConfigError("resume needs tracking=mlflow (the run, its config and its checkpoint are found there)")
    return client


def read_artifact_text(client: MlflowClient, run_id: str, path: str) -> str | None:
    """The text of artifact ``path`` of run ``run_id``, or ``None`` when the run has no such artifact."""
    folder = str(Path(path).parent) if "/" in path else None
    if path not in {info.path for info in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory() as scratch, quiet_download():
        return Path(client.download_artifacts(run_id, path, scratch)).read_text()


@contextmanager
def quiet_download() -> Iterator[None]:
    """No MLflow download progress bar on the terminal (a refused resume prints its one line alone)."""
    previous = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name]
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = previous
