"""Where runs are stored: the default store, and a check that a store can be used before training starts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _tracking_store_registry

from metalab.errors import ConfigError

# MLflow's own default since 3.7 (a SQLite file in the working directory); the one spelling of it in
# the package. conf/tracking/mlflow.yaml repeats it as the fallback of ${oc.env:MLFLOW_TRACKING_URI,...}.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ENV_VAR = "MLFLOW_TRACKING_URI"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else :data:`DEFAULT_TRACKING_URI` (as ``tracking=mlflow`` chooses)."""
    return os.environ.get(ENV_VAR) or DEFAULT_TRACKING_URI


def require_reachable(tracking_uri: str, timeout: float = 3.0) -> None:
    """Fail in seconds, before training, when the tracking store cannot be reached or written.

    The one line names where the URI came from: ``$MLFLOW_TRACKING_URI`` (set in the shell, never typed on
    the command line) or ``tracking.tracking_uri``.
    """
    setting = uri_setting(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            problem = str(getattr(error, "reason", error))
        raise ConfigError(f"MLflow tracking server {tracking_uri} does not answer ({problem}): start it, or set "
                          f"{setting} to a reachable store{_unset_hint(setting)}, or use tracking=none")
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve().parent
        if not folder.is_dir() or not _writable(folder):
            raise ConfigError(f"{setting}={tracking_uri}: folder {folder} does not exist or is not writable: "
                              f"set {setting} to a writable path{_unset_hint(setting)}")
        return
    try:  # MLflow's own lookup of a store for the URI's scheme: builds nothing (private, but MLflow is pinned)
        _tracking_store_registry.get_store_builder(tracking_uri)
    except MlflowException:
        raise ConfigError(f"{setting}={tracking_uri}: MLflow has no tracking store for this URI: set {setting} to "
                          f"sqlite:///<path>.db or http(s)://<server>{_unset_hint(setting)}") from None


def uri_setting(tracking_uri: str) -> str:
    """The setting a user changes to fix ``tracking_uri``: the environment variable when it came from there."""
    return ENV_VAR if os.environ.get(ENV_VAR) == tracking_uri else "tracking.tracking_uri"


def _unset_hint(setting: str) -> str:
    return f" (or unset it: runs then go to ./{DEFAULT_TRACKING_URI[len('sqlite:///'):]})" if setting == ENV_VAR else ""


def _writable(folder: Path) -> bool:
    probe = folder / ".metalab-write-probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError:
        return False
    return True
