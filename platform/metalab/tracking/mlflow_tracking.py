"""``tracking=mlflow``: one MLflow run per job, holding config, source version, metrics and status."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from omegaconf import DictConfig, OmegaConf

from metalab.errors import ConfigError, one_line
from metalab.tracking.base import RunInfo, Tracking
from metalab.tracking.client import experiment_id, fit_tags, open_client, source_tags
from metalab.tracking.config_hash import CONFIG_HASH_TAG, config_hash
from metalab.tracking.data import log_data
from metalab.tracking.logger import MLflowRunLogger, ResumedMLFlowLogger
from metalab.tracking.outbox import Outbox, system_monitor
from metalab.tracking.pending import finish_run
from metalab.tracking.registry import MODEL_ARTIFACT_PATH, MODEL_TAG, model_uri
from metalab.tracking.sweeps import current_sweep
from metalab.tracking.uri import DEFAULT_TRACKING_URI, require_reachable, ui_page

RUN_ID_FILE = "mlflow_run_id"  # written into the job's output folder when its run starts
SYSTEM_METRICS_TAG = "metalab.system_metrics"  # which system metrics the run records, or why none


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """``{"algorithm": {"inner_lr": 0.01}}`` → ``{"algorithm.inner_lr": "0.01"}`` (lists stay whole)."""
    if not isinstance(config, dict):
        return {prefix: str(config)}
    flat: dict[str, str] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


class MLflowTracking(Tracking):
    """Records a job as an MLflow run.

    The run is created here, with the client, rather than by Lightning's ``MLFlowLogger``: the logger
    truncates params to 250 characters and fills no git tags. The logger is then attached to the run
    (``run_id=``) and streams the metrics. The run also holds the config's hash (tag
    ``metalab.config_hash``, :mod:`metalab.tracking.config_hash`), the data it used (a dataset input,
    :mod:`metalab.tracking.data`) and MLflow's system metrics (``system/*``: CPU, memory, disk, network, and
    GPU where ``pynvml`` finds one), sampled every ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds
    (MLflow's default: 10). When the run ends it draws its ``meta_val/*`` history as
    ``figures/validation_curve.png`` (:mod:`metalab.figures`). Its experiment is marked as a model-training one
    and, on a SQLite store, keeps its artifacts in ``mlruns`` beside the database (:func:`~.client.experiment_id`).
    Once the run is open its writes go through an outbox (:mod:`metalab.tracking.outbox`): a store that stops
    answering never blocks or fails the run, and what it did not take waits in ``<output dir>/mlflow_pending.jsonl``.

    Arguments:
        tracking_uri: where runs go; the config default is ``$MLFLOW_TRACKING_URI``, else ``DEFAULT_TRACKING_URI``
            (``metalab.tracking.uri``).
        experiment_name: ``None`` = the task family's name, so runs compare across algorithms by design.
        run_name: ``None`` = ``<algorithm>-<task>-<time>``, in a sweep ``<algorithm>-<task>-<swept values>-#<job>``.
        outage_wait_s: how long the end of a run waits for a store that does not take its records before leaving
            them in ``mlflow_pending.jsonl`` (the run then stays RUNNING in the store).
        register_as: register a finished run's model (artifact ``model``, :mod:`metalab.serving`) in the Model
            Registry under this name, a new version per run with its ``meta_test/*`` metrics as the version's tags;
            ``None``: log the model, register nothing.
    """

    logs_models = True

    def __init__(self, tracking_uri: str = DEFAULT_TRACKING_URI, experiment_name: str | None = None,
                 run_name: str | None = None, outage_wait_s: float = 30.0, register_as: str | None = None) -> None:
        if register_as is not None and not register_as.strip():
            raise ConfigError("tracking.register_as must be a model name or null, got an empty name")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.outage_wait_s = outage_wait_s
        self.register_as = register_as
        self.outbox: Outbox | None = None  # the open run's
        self.run_id: str | None = None
        self.experiment_id: str | None = None  # the open run's
        self._system_metrics: Any = None  # MLflow's SystemMetricsMonitor of the open run, if it runs

    @functools.cached_property
    def client(self) -> MlflowClient:
        """Opened on first use: a run that fails its checks before training never touches the store."""
        return open_client(self.tracking_uri)

    def check(self) -> None:
        require_reachable(self.tracking_uri)

    def describe(self) -> str:
        """``<tracking URI>, experiment sinusoid, run maml-sinusoid-20260101-120000``: read back from the store,
        so a resumed run or a sweep's job (experiment ``sweeps``) says where it really is."""
        run = self.client.get_run(self.run_id)
        experiment = self.client.get_experiment(run.info.experiment_id).name
        return f"{self.tracking_uri}, experiment {experiment}, run {run.info.run_name}"

    def start(self, cfg: DictConfig, info: RunInfo) -> MLflowRunLogger:
        require_reachable(self.tracking_uri)
        tags = {"metalab.output_dir": str(info.output_dir),
                "metalab.checkpoint_dir": str(info.output_dir / "checkpoints"), CONFIG_HASH_TAG: config_hash(cfg)}
        self._create_run(info.experiment_name, info.run_name, info.choices, tags)
        self._log_config(cfg, info)
        if info.data:
            log_data(self.client, self.run_id, info.data)
        info.output_dir.mkdir(parents=True, exist_ok=True)
        self._open_outbox(info.output_dir)
        self._monitor_system()
        (info.output_dir / RUN_ID_FILE).write_text(f"{self.run_id}\n")  # for resume=auto after a requeue
        return MLflowRunLogger(tracking_uri=self.tracking_uri, run_id=self.run_id, client=self.client,
                               experiment_id=self.experiment_id)

    def locate(self, run_id: str) -> tuple[Path, Path]:
        require_reachable(self.tracking_uri)
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"resume={run_id}: no MLflow run with that id in {self.tracking_uri}: check the id "
                              "(`make ui` lists runs) and the tracking URI") from None
        checkpoint = Path(run.data.tags.get("metalab.checkpoint_dir", "."), "last.ckpt")
        if not checkpoint.is_file():
            raise ConfigError(f"resume={run_id}: {checkpoint} does not exist (the run saved no checkpoint before it "
                              "stopped): start a new run")
        return Path(run.data.tags["metalab.output_dir"]), checkpoint

    def resume(self, run_id: str) -> ResumedMLFlowLogger:
        output_dir, checkpoint = self.locate(run_id)
        run = self.client.get_run(run_id)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self._open_outbox(output_dir)  # first stores what a process before left pending, so steps count right
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "metalab.resumed_from", str(checkpoint))
        if "metalab.error" in run.data.tags:  # why it stopped before; the continued run sets its own, if any
            self.client.delete_tag(run_id, "metalab.error")
        # Steps logged after the checkpoint (before the run died) are not logged twice. The keys are read again:
        # the outbox has just stored what the process before left pending, perhaps a key's first values.
        stored = self.client.get_run(run_id).data.metrics
        logged = {key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in stored}
        self._monitor_system(resume=True)
        return ResumedMLFlowLogger(logged, tracking_uri=self.tracking_uri, run_id=run_id, client=self.client,
                                   experiment_id=self.experiment_id)

    def run_begun_in(self, output_dir: Path) -> str | None:
        """The id ``start`` wrote into ``output_dir``, if its run saved a checkpoint to continue from."""
        marker = output_dir / RUN_ID_FILE
        if not marker.is_file() or not (output_dir / "checkpoints" / "last.ckpt").is_file():
            return None
        return marker.read_text().strip() or None

    def ui_page(self) -> str | None:
        return ui_page(self.tracking_uri, self.experiment_id, self.run_id) if self.run_id else None

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in fit_tags(tags).items():
            self.client.set_tag(self.run_id, key, value)

    def log_model(self, folder: Path, metrics: dict[str, float]) -> None:
        """Through the outbox, as every record: the folder, then its registration, reach the store in order, and
        wait in ``mlflow_pending.jsonl`` for ``metalab sync`` if it does not answer."""
        self.outbox.put(self.run_id, artifact=str(folder), artifact_path=MODEL_ARTIFACT_PATH)
        self.set_tags({MODEL_TAG: model_uri(self.run_id)})
        if self.register_as:
            self.outbox.put(self.run_id, register=self.register_as,
                            tags={name: f"{value:.6g}" for name, value in metrics.items()})

    def _open_outbox(self, output_dir: Path) -> None:
        """From here on the run's writes (metrics, tags, figures, its end) go through its outbox."""
        self.outbox = Outbox(self.tracking_uri, self.run_id, output_dir, self.outage_wait_s)
        self.client = self.outbox.client

    def _monitor_system(self, resume: bool = False) -> None:
        """Start MLflow's system-metrics thread on the open run (``resume``: continuing its steps).

        ``mlflow.enable_system_metrics_logging()`` reaches only runs opened by the fluent ``mlflow.start_run``;
        this run was created with the client, so the monitor is started on its id. The monitor needs
        ``psutil``, an optional dependency of MLflow: without it the tag says so and the run goes on.
        """
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # the tag says what runs, once
        try:
            monitor = system_monitor(self.client, self.run_id, resume, self.tracking_uri)
        except ImportError as error:
            self.set_tags({SYSTEM_METRICS_TAG: f"off: {error.name} is not installed (pip install {error.name})"})
            return
        monitor.start()
        self._system_metrics = monitor
        kinds = [type(m).__name__.removesuffix("Monitor").lower().replace("cpu", "cpu, memory")
                 for m in monitor.monitors]  # gpu only where pynvml (nvidia-ml-py) finds one
        self.set_tags({SYSTEM_METRICS_TAG: f"every {monitor.sampling_interval:g} s: {', '.join(kinds)}"})

    def _create_run(self, experiment_name: str, run_name: str, choices: dict[str, str], tags: dict[str, str]) -> None:
        """A run in the sweep's experiment, nested under its parent, or in ``experiment_name`` alone."""
        sweep = current_sweep()
        if sweep is not None:
            experiment = sweep.experiment_id
            tags = tags | {"mlflow.parentRunId": sweep.parent_run_id, "metalab.sweep_id": sweep.sweep_id}
        else:
            experiment = experiment_id(self.client, self.experiment_name or experiment_name)
        tags = tags | source_tags() | {f"metalab.{group}": choice for group, choice in choices.items()}
        run = self.client.create_run(experiment, run_name=self.run_name or run_name, tags=fit_tags(tags))
        self.run_id, self.experiment_id = run.info.run_id, experiment

    def _log_config(self, cfg: DictConfig, info: RunInfo) -> None:
        """Every resolved value as a param; the YAML, the overrides and Hydra's own files as artifacts."""
        params = [Param(key, value[:MAX_PARAM_VAL_LENGTH])
                  for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        self.client.log_text(self.run_id, "".join(f"- {line}\n" for line in info.overrides) or "[]\n",
                             "config/overrides.yaml")
        hydra_dir = info.output_dir / ".hydra"
        if hydra_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(hydra_dir), "config/hydra")

    def finish(self, status: str, error: BaseException | None = None) -> None:
        if self.run_id is None:
            if current_sweep() is None:
                return  # a bad single run leaves no record; the error line says why
            # A sweep job that failed before its run opened still gets a (FAILED) run, so the sweep counts it.
            runtime = HydraConfig.get()
            choices = {g: str(c) for g, c in runtime.runtime.choices.items() if c and not g.startswith("hydra")}
            self._create_run("", f"{choices.get('algorithm', 'run')}-failed", choices,
                             {"metalab.overrides": " ".join(runtime.overrides.task)})
        if self._system_metrics is not None:
            self._system_metrics.finish()  # stops the thread and stores its last samples
            self._system_metrics = None
        if error is not None:
            self.set_tags({"metalab.error": one_line(error)})
        if self.outbox is not None:  # the validation curve and the status, once the store holds every record
            self.outbox.close(status)
        else:  # a sweep job that failed before its run opened
            finish_run(self.client, self.run_id, status)

