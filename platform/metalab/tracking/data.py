"""The data a run used, as an MLflow dataset input (the run page's "Datasets used"), and read back.

A task family describes its data (:meth:`metalab.tasks.base.TaskFamily.data_description`); here that
description becomes one ``mlflow.data`` dataset on the run: its name, source, digest and, as its profile,
everything else (what the digest covers, split and class counts, a generator's parameters).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import CodeDatasetSource, LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Run
from mlflow.tracking import MlflowClient

DATA_CONTEXT = "meta-train/val/test"  # one input serves all three splits; their counts are in the profile
_DATASET_FIELDS = ("name", "source_type", "source", "digest")


class TaskData(MetaDataset):
    """A metadata-only dataset whose profile (shown in the UI) is a task family's description."""

    def __init__(self, description: Mapping[str, str]) -> None:
        missing = [key for key in _DATASET_FIELDS if not description.get(key)]
        if missing:
            raise ValueError(f"a data description needs {', '.join(missing)}; got {dict(description)}")
        source = (LocalArtifactDatasetSource(description["source"]) if description["source_type"] == "local"
                  else CodeDatasetSource({"generator": description["source"]}))
        super().__init__(source, name=description["name"], digest=description["digest"])
        self._profile = {key: value for key, value in description.items() if key not in _DATASET_FIELDS}

    @property
    def profile(self) -> dict[str, str]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def log_data(client: MlflowClient, run_id: str, description: Mapping[str, str]) -> None:
    """Record ``description`` (``name``, ``source_type`` "local" or "generated", ``source``, ``digest`` and any
    counts) on run ``run_id`` as its dataset input.

    Example:
        log_data(client, run_id, task.data_description())
    """
    dataset = TaskData(description)._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", DATA_CONTEXT)])])


def data_digest(run: Run | Any) -> str | None:
    """The digest of the data run ``run`` recorded (several joined by "+"), ``None`` if it recorded none."""
    inputs = getattr(run.inputs, "dataset_inputs", None) or []
    digests = sorted({entry.dataset.digest for entry in inputs})
    return "+".join(digests) or None
