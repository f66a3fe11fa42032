"""Where runs are stored: the default store, and a check that a store can be used before training starts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from metalab.errors import ConfigError

# MLflow's own default since 3.7 (a SQLite file in the working directory); the one spelling of it in
# the package. conf/tracking/mlflow.yaml repeats it as the fallback of ${oc.env:MLFLOW_TRACKING_URI,...}.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else :data:`DEFAULT_TRACKING_URI` (as ``tracking=mlflow`` chooses)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


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
