"""A run's learner in MLflow's Model Registry: one version per run, its test metrics as the version's tags.

The model itself is the run's artifact folder :data:`MODEL_ARTIFACT_PATH` (written by :mod:`metalab.serving`);
registering it is idempotent per run, so a record sent twice (an outage's retry, ``metalab sync``) still leaves one
version.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metalab.errors import ConfigError
from metalab.tracking.client import fit_tags

MODEL_ARTIFACT_PATH = "model"  # the run's artifact folder holding its MLflow Model
MODEL_TAG = "metalab.model"  # on the run: the model's URI, or why it has none


def model_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"


def register_version(client: MlflowClient, name: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Register run ``run_id``'s model as a new version of ``name`` (created if new) with ``tags``; a run already
    registered there keeps its version. Returns the version."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        return str(found[0].version)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, model_uri(run_id), run_id=run_id, tags=fit_tags(dict(tags)))
    return str(version.version)


def require_model(client: MlflowClient, run_id: str) -> None:
    """ConfigError unless run ``run_id`` holds a logged model (its artifact folder :data:`MODEL_ARTIFACT_PATH`)."""
    if not any(item.path.endswith("MLmodel") for item in client.list_artifacts(run_id, MODEL_ARTIFACT_PATH)):
        why = client.get_run(run_id).data.tags.get(MODEL_TAG, "it ended before models were logged, or its store "
                                                                "did not take the model yet (metalab sync)")
        raise ConfigError(f"run {run_id} has no logged model ({why}): choose a run of a supervised algorithm that "
                          "finished with tracking=mlflow")
