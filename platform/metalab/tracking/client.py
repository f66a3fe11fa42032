"""Helpers over ``MlflowClient`` shared by a job's run, a sweep's parent run and the reports."""

from __future__ import annotations

import fcntl
from collections.abc import Mapping
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

import metalab
from metalab.tracking.git import git_state
from metalab.tracking.uri import artifact_root, sqlite_folder

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
    lets the first create the tables and the others find them; MLflow caches the opened store per URI.
    """
    folder = sqlite_folder(tracking_uri)
    if folder is None:
        return MlflowClient(tracking_uri)
    with (folder / f".{Path(tracking_uri).name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return MlflowClient(tracking_uri)  # builds (and caches) the store: creates the tables


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
