"""Helpers over ``MlflowClient`` shared by a job's run, a sweep's parent run and the reports."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

import metalab
from metalab.tracking.git import git_state

MAX_TAG_LENGTH = MAX_TAG_VAL_LENGTH  # what the store accepts (8000 in MLflow 3); longer values are cut here


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
    """The id of experiment ``name``, created if it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)
