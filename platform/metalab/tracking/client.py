"""Helpers over ``MlflowClient`` shared by a job's run, a sweep's parent run and the reports."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

import metalab
from metalab.tracking.git import git_state
from metalab.tracking.uri import artifact_root

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


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, marked as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`).

    Created if it does not exist yet, with its artifacts beside a SQLite store (:func:`artifact_root`); an
    existing one without a kind (made by hand, or by an older metalab) gets it, one with a kind keeps it.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri),
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
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
