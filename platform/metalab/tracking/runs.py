"""Reading recorded runs back, and annotating them: what ``metalab compare`` and ``metalab reproduce`` need."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from metalab.errors import ConfigError
from metalab.tracking.client import fit_tags
from metalab.tracking.data import data_digest
from metalab.tracking.registry import register_version, require_model
from metalab.tracking.uri import default_tracking_uri

BEST_TAG = "metalab.best"  # on the run `metalab compare --register` found best: the metric and its value


@dataclass
class RecordedRun:
    """One run as the reports use it."""

    run_id: str
    name: str
    metrics: dict[str, float]  # the last value of each metric
    tags: dict[str, str]


class RunStore:
    """The runs of one tracking store.

    Arguments:
        tracking_uri: ``None`` = ``$MLFLOW_TRACKING_URI``, else ``DEFAULT_TRACKING_URI`` (as ``tracking=mlflow``).

    Example:
        store = RunStore()  # $MLFLOW_TRACKING_URI or ./mlflow.db
        runs = store.finished_runs(tags={"metalab.sweep_id": "sweep-20261126-054431-7f24"})
        runs["metrics.meta_test/post_loss"].mean()
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)

    def experiment_ids(self, names: Sequence[str] | None = None) -> list[str]:
        """The ids of experiments ``names`` (``None`` = all); ConfigError naming those that do not exist."""
        experiments = self.client.search_experiments()
        missing = set(names or []) - {e.name for e in experiments}
        if missing:
            raise ConfigError(f"no experiment named {', '.join(sorted(missing))}; there are: "
                              f"{', '.join(sorted(e.name for e in experiments)) or 'none'}")
        return [e.experiment_id for e in experiments if names is None or e.name in names]

    def finished_runs(self, experiments: Sequence[str] | None = None,
                      tags: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Finished runs (no sweep parents) with every tag of ``tags``, as ``mlflow.search_runs``' DataFrame
        (``run_id``, ``params.*``, ``metrics.*``, ``tags.*``); ConfigError if there is none."""
        tags = dict(tags or {})
        clauses = ["attributes.status = 'FINISHED'", *(f"tags.`{key}` = '{value}'" for key, value in tags.items())]
        mlflow.set_tracking_uri(self.tracking_uri)  # mlflow.search_runs reads the global URI
        runs = mlflow.search_runs(self.experiment_ids(experiments), " and ".join(clauses), max_results=50_000)
        if "tags.metalab.sweep_parent" in runs:
            runs = runs[runs["tags.metalab.sweep_parent"] != "true"]
        if runs.empty:
            chosen = f"experiments {', '.join(experiments)}" if experiments else "all experiments"
            raise ConfigError(f"no finished run matches ({chosen}, tags={tags}): check the filters "
                              "(`mlflow ui` shows what is there)")
        return runs

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        """Step → value of metric ``key`` of run ``run_id`` (empty if the run never logged it)."""
        return {metric.step: metric.value for metric in self.client.get_metric_history(run_id, key)}

    def data_digests(self, run_ids: Sequence[str]) -> dict[str, str | None]:
        """Run id → the digest of the data the run recorded as its dataset input (``None``: it recorded none)."""
        return {run_id: data_digest(self.client.get_run(run_id)) for run_id in run_ids}

    def latest_finished_run(self, tags: Mapping[str, str],
                            params: Mapping[str, object] | None = None) -> RecordedRun | None:
        """The newest FINISHED run with these tags and params (values compared as strings), if any."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        if not experiments:
            return None
        clauses = ["attributes.status = 'FINISHED'", *(f"tags.`{key}` = '{value}'" for key, value in tags.items()),
                   *(f"params.`{key}` = '{value}'" for key, value in (params or {}).items())]
        runs = self.client.search_runs(experiments, filter_string=" and ".join(clauses),
                                       order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        return RecordedRun(runs[0].info.run_id, runs[0].info.run_name, dict(runs[0].data.metrics),
                           dict(runs[0].data.tags))

    def sweep_parent(self, sweep_id: str, experiments: Sequence[str] | None = None) -> str | None:
        """The id of sweep ``sweep_id``'s parent run, if it is among ``experiments`` (``None`` = all)."""
        parents = self.client.search_runs(self.experiment_ids(experiments),
                                          f"tags.`metalab.sweep_id` = '{sweep_id}' and "
                                          "tags.`metalab.sweep_parent` = 'true'", max_results=1)
        return parents[0].info.run_id if parents else None

    def latest_sweep(self, experiments: Sequence[str] | None = None) -> str:
        """The id of the newest sweep (by its parent run's start) among ``experiments`` (``None`` = all)."""
        parents = self.client.search_runs(self.experiment_ids(experiments), "tags.`metalab.sweep_parent` = 'true'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise ConfigError(f"--sweep last: no sweep in {self.tracking_uri}: start one with metalab-train -m ... "
                              "(or pass --tracking-uri of the store it used)")
        return parents[0].data.tags["metalab.sweep_id"]

    def annotate(self, run_id: str, tags: Mapping[str, str] | None = None, texts: Mapping[str, str] | None = None,
                 files: Sequence[Path] = (), folder: str | None = None) -> None:
        """Add to a finished run: ``tags`` (values cut to ``MAX_TAG_LENGTH``), ``texts`` (artifact file → content)
        and ``files`` (copied into the artifact folder ``folder``; ``None`` = the top)."""
        for key, value in fit_tags(tags or {}).items():
            self.client.set_tag(run_id, key, value)
        for artifact_file, text in (texts or {}).items():
            self.client.log_text(run_id, text, artifact_file)
        for file in files:
            self.client.log_artifact(run_id, str(file), folder)

    def register_best(self, run_id: str, name: str, metric: str) -> str:
        """Mark run ``run_id`` as the best by ``metric`` (tag ``metalab.best``) and register its model as a version
        of ``name`` (its ``meta_test/*`` metrics as the version's tags; a run registered there before keeps its
        version); return the version. ConfigError if the run logged no model."""
        require_model(self.client, run_id)
        run = self.client.get_run(run_id)
        self.client.set_tag(run_id, BEST_TAG, f"{metric} = {run.data.metrics[metric]:.6g} (metalab compare)")
        tags = {key: f"{value:.6g}" for key, value in run.data.metrics.items() if key.startswith("meta_test/")}
        return register_version(self.client, name, run_id, tags)
