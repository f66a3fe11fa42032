"""Helpers over ``MlflowClient`` shared by a job's run, a sweep's parent run and the reports."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

import metalab
from metalab.tracking.git import git_state
from metalab.tracking.uri import artifact_root, sqlite_database

MAX_TAG_LENGTH = MAX_TAG_VAL_LENGTH  # what the store accepts (8000 in MLflow 3); longer values are cut here
# MLflow's record of what an experiment is for (its UI's experiment-kind selector writes this tag):
# "custom_model_development" is the UI's "Machine learning" kind, as opposed to "genai_development". MLflow
# 3.17's UI picks its view from the address or its sidebar switch instead (see uri.ui_page).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def fit_tags(tags: Mapping[str, object]) -> dict[str, str]:
    """Tag values as strings of at most :data:`MAX_TAG_LENGTH` characters (a longer one would be refused)."""
    return {key: str(value)[:MAX_TAG_LENGTH] for key, value in tags.items()}


def source_tags() -> dict[str, str]:
    """Where a run's code came from: metalab's version, git commit and whether the checkout was dirty."""
    tags = {"mlflow.source.name": "metalab-train", "mlflow.source.type": "LOCAL",
            "metalab.version": metalab.__version__}
    git = git_state(Path(metalab.__file__).parent)
    if git:
        tags |= {"mlflow.source.git.commit": git["commit"], "metalab.git.dirty": git["dirty"]}
    return tags


def open_client(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` on ``tracking_uri`` whose store exists, also when several processes start at once.

    MLflow creates a fresh SQLite database's tables in whichever process opens it first, without a lock: two
    runs started together on a new ``mlflow.db`` both migrate it and one fails (alembic's "Online migration
    expected to match one row"). Opening the store under an exclusive lock on a hidden file beside the database
    lets the first create the tables and the others find them; MLflow caches the opened store per URI. A new
    database starts as a copy of :func:`empty_store`.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri)
    with database.with_name(f".{database.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not database.exists() and (template := empty_store()) is not None:
            shutil.copyfile(template, database)
        return MlflowClient(tracking_uri)  # builds (and caches) the store: creates the tables if not copied


def empty_store() -> Path | None:
    """An empty SQLite store with the installed MLflow's tables, made once per MLflow version in
    ``$XDG_CACHE_HOME/metalab`` (default ``~/.cache/metalab``); ``None`` where that folder cannot be written.

    MLflow makes a new database by running every schema migration since its first release (~70: seconds of a
    short run's start-up, mostly SQLite syncing each statement to disk); copying the result takes milliseconds.
    It holds tables only: MLflow adds its "Default" experiment (whose artifact folder depends on the working
    directory) when it opens the copy, and checks the copy's schema version against its own, as for any store.
    """
    import sqlalchemy  # here, as MLflow does: a store on a server needs neither
    from mlflow.store.db.utils import _initialize_tables  # private, but MLflow is pinned

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metalab"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if template.is_file():
        return template
    partial = cache / f".{template.name}.{os.getpid()}"  # made aside, then renamed: a reader never sees half
    try:
        cache.mkdir(parents=True, exist_ok=True)
        engine = sqlalchemy.create_engine(f"sqlite:///{partial}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(partial, template)
    except (OSError, sqlalchemy.exc.SQLAlchemyError):  # e.g. a read-only home: MLflow makes the store itself
        with contextlib.suppress(OSError):
            partial.unlink()
        return None
    return template


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, marked as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`).

    Created if it does not exist yet, with its artifacts beside a SQLite store (:func:`artifact_root`); an
    existing one without a kind (made by hand, or by an older metalab) gets it, one with a kind keeps it.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException:  # another run started at the same moment created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def flush(client: MlflowClient) -> None:
    """Store every value logged asynchronously to ``client``'s store so far.

    Asynchronous writes queue in the store object of their tracking URI, which MLflow caches per URI, so a
    run's logger and ``client`` share the queue. ``mlflow.flush_async_logging()`` flushes only the default
    store's (and opens ./mlflow.db in the working directory to do so).
    """
    client._tracking_client.store.flush_async_logging()
