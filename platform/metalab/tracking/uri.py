"""Where runs are stored (the default store, a check that a store can be used before training starts, where
artifacts go) and where the MLflow UI shows them."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _tracking_store_registry

from metalab.errors import ConfigError

# MLflow's own default since 3.7 (a SQLite file in the working directory); the one spelling of it in
# the package. conf/tracking/mlflow.yaml repeats it as the fallback of ${oc.env:MLFLOW_TRACKING_URI,...}.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `make ui` serves a local store (the Makefile's HOST and PORT)
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
    folder = sqlite_folder(tracking_uri)
    if folder is not None:
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


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (absolute, without the URI's ``?query``, e.g.
    ``?timeout=30``); ``None`` for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder holding the database of a ``sqlite:///`` store (absolute); ``None`` for other stores."""
    database = sqlite_database(tracking_uri)
    return None if database is None else database.parent


def artifact_root(tracking_uri: str) -> str | None:
    """Where the artifacts of an experiment metalab creates go: ``mlruns`` beside a SQLite store's database;
    ``None`` (the store's own default) for other stores.

    MLflow's default for a SQLite store is ``./mlruns`` in the working directory of whichever process creates
    the experiment, so runs tracked to a database elsewhere would scatter artifacts over working directories.
    """
    folder = sqlite_folder(tracking_uri)
    return None if folder is None else str(folder / "mlruns")


def ui_page(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (or of one of its runs), in the UI's model-training view.

    A tracking server serves its own UI; a local store is served by ``make ui``. MLflow 3.17's UI opens in its
    GenAI view (traces, "Evaluation runs") unless the address asks for ``workflowType=machine_learning`` or the
    user has switched to "Model training" in the sidebar; the experiment's kind tag does not choose it.
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI_ADDRESS
    page = f"{base}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{page}?workflowType=machine_learning"


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: a temporary file of a unique name (jobs started together all
    probe the same folder; one fixed name, touched and removed by each, made one job's removal fail another's)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".metalab-write-probe-"):
            return True
    except OSError:
        return False
