"""One concern, one package: MLflow is called from metalab/tracking/ only, the default store is spelled once,
and `report` records what the learner hands it through whichever logger it has."""

from __future__ import annotations

import multiprocessing
import re
import time
from pathlib import Path

import pytest
from matplotlib import pyplot as plt
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import Logger

import metalab
from metalab.tracking import DEFAULT_TRACKING_URI, MAX_TAG_LENGTH, MLflowRunLogger, report
from metalab.tracking.client import experiment_id, flush, open_client
from metalab.tracking.logger import ResumedMLFlowLogger
from metalab.tracking.outbox import SEND_EVERY_S, Outbox

PACKAGE = Path(metalab.__file__).parent
TRACKING = PACKAGE / "tracking"
SERVING = PACKAGE / "serving"
CONF = PACKAGE.parents[1] / "conf"


def sources() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_only_the_tracking_and_serving_packages_import_mlflow() -> None:
    """Runs and stores are tracking/'s; MLflow's model format (a run's learner as an MLflow Model) is serving/'s."""
    importing = {path for path, text in sources().items()
                 if re.search(r"^\s*(import mlflow|from mlflow[\s.])", text, re.MULTILINE)}
    assert importing, "the pattern finds nothing: it no longer matches how MLflow is imported"
    assert {path.relative_to(PACKAGE) for path in importing
            if TRACKING not in path.parents and SERVING not in path.parents} == set()
    # ... and tracking/ depends on none of its users (sweep.py once imported mlflow_tracking.py and back).
    users = re.compile(r"^\s*(from|import) metalab\.(sweep|compare|reproduce|learner|train)\b", re.MULTILINE)
    assert [path.name for path in TRACKING.glob("*.py") if users.search(path.read_text())] == []


def test_the_default_store_is_spelled_once() -> None:
    spelled = [(path.relative_to(PACKAGE), text.count(DEFAULT_TRACKING_URI)) for path, text in sources().items()
               if DEFAULT_TRACKING_URI in text]
    assert spelled == [(Path("tracking/uri.py"), 1)]
    in_yaml = [path.relative_to(CONF) for path in CONF.rglob("*.yaml") if DEFAULT_TRACKING_URI in path.read_text()]
    assert in_yaml == [Path("tracking/mlflow.yaml")]  # the fallback of ${oc.env:MLFLOW_TRACKING_URI,...}


def figure() -> plt.Figure:
    drawn, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [1, 0])
    return drawn


def test_report_records_tags_figures_and_metrics_on_the_mlflow_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/runs.db"
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, "report")).info.run_id
    logger = MLflowRunLogger(tracking_uri=uri, run_id=run_id, synchronous=False)  # as MLflowTracking.start
    curve = figure()
    report(logger, tags={"metalab.backend": "vmap", "metalab.long": "x" * (MAX_TAG_LENGTH + 10)},
           figures={"inner_loop.png": curve}, metrics={"meta_train/inner_lr": 0.5}, step=7)
    report(logger, metrics={"meta_train/inner_lr": 0.25}, step=9)
    flush(client)
    tags = client.get_run(run_id).data.tags
    assert tags["metalab.backend"] == "vmap" and tags["metalab.long"] == "x" * MAX_TAG_LENGTH
    assert [artifact.path for artifact in client.list_artifacts(run_id)] == ["inner_loop.png"]
    history = client.get_metric_history(run_id, "meta_train/inner_lr")
    assert sorted((metric.step, metric.value) for metric in history) == [(7, 0.5), (9, 0.25)]
    assert not plt.fignum_exists(curve.number)


def test_a_resumed_run_reports_too_but_skips_steps_it_holds(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/runs.db"
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, "resumed")).info.run_id
    logger = ResumedMLFlowLogger({"loss": 5}, tracking_uri=uri, run_id=run_id)
    report(logger, tags={"metalab.resumed": "yes"}, metrics={"loss": 1.0}, step=5)  # logged before it died
    report(logger, metrics={"loss": 2.0}, step=6)
    assert client.get_run(run_id).data.tags["metalab.resumed"] == "yes"
    assert [(metric.step, metric.value) for metric in client.get_metric_history(run_id, "loss")] == [(6, 2.0)]


class Recorder(Logger):
    """A Lightning logger that is not MLflow's: it records metrics only."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((metrics, step))


@pytest.mark.parametrize("logger", [None, Recorder()], ids=["no logger", "another logger"])
def test_report_without_mlflow_keeps_the_metrics_it_can_and_closes_the_figures(logger: Logger | None) -> None:
    curve = figure()
    report(logger, tags={"metalab.backend": "vmap"}, figures={"inner_loop.png": curve}, metrics={"loss": 1.0},
           step=3)
    assert not plt.fignum_exists(curve.number)
    if logger is not None:
        assert logger.logged == [({"loss": 1.0}, 3)]


def open_and_name_experiment(tracking_uri: str) -> str:
    return experiment_id(open_client(tracking_uri), "sinusoid")


def test_runs_started_together_on_a_new_store_all_open_it_and_share_one_experiment(tmp_path: Path) -> None:
    """Two runs launched at once on a fresh mlflow.db both used to migrate it, and one died ("Online migration
    expected to match one row"); both also created experiment "sinusoid". Four processes here, one start."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(open_and_name_experiment, [uri] * 4)
    assert len(set(ids)) == 1
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["sinusoid", "Default"]


def test_the_outbox_sends_the_records_of_one_interval_in_one_batch(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path}/runs.db"
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, "outbox")).info.run_id
    sent: list[int] = []  # metrics per log_batch call the store received
    log_batch = MlflowClient.log_batch

    def counted(self: MlflowClient, run_id: str, metrics: list[Metric] = (), *args: object, **kwargs: object) -> None:
        sent.append(len(metrics))
        log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    outbox = Outbox(uri, run_id, tmp_path / "out", wait_s=10)
    for step in range(20):  # one record every 1/20 of the interval, as a logger every 50 steps of a fast run
        outbox.client.log_batch(run_id, metrics=[Metric("meta_train/loss", float(step), 1000 + step, step)])
        time.sleep(SEND_EVERY_S / 20)
    outbox.close("FINISHED")
    assert sum(sent) == 20 and len(sent) <= 3, sent  # the first record alone, then the rest of the interval
    assert [m.step for m in client.get_metric_history(run_id, "meta_train/loss")] == list(range(20))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_store_uri_with_a_query_names_its_database_and_lock_without_it(tmp_path: Path) -> None:
    client = open_client(f"sqlite:///{tmp_path}/runs.db?timeout=30")
    experiment_id(client, "query")
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "mlruns") == [".runs.db.lock", "runs.db"]
    assert MlflowClient(f"sqlite:///{tmp_path}/runs.db").get_experiment_by_name("query") is not None


def test_jobs_starting_together_all_find_the_store_folder_writable(tmp_path: Path) -> None:
    """Eight threads probe one folder 100 times each, as the jobs of a parallel sweep do at start; with one fixed
    probe file, touched and removed by each, a removal failed another's and a job was told its folder was not
    writable (test_reliability's eight-job sweep, 1 run in 8 FAILED)."""
    from concurrent.futures import ThreadPoolExecutor

    from metalab.tracking.uri import require_reachable

    def probe(_: int) -> None:
        for _ in range(100):
            require_reachable(f"sqlite:///{tmp_path}/mlflow.db")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(probe, range(8)))  # re-raises a ConfigError of any thread
    assert list(tmp_path.iterdir()) == []  # no probe left behind
