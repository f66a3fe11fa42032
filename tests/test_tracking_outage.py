"""A tracking server that goes away mid-training: the run goes on, loses no record, says so in one line when the
outage begins and one when it ends; what the server never took waits in the run's folder for ``metalab sync``.

The server is the lab's (PostgreSQL backend, scripts/tracking_server.sh), started here and stopped and restarted
for real while a real ``metalab-train`` process trains. A callback holds training at chosen steps, so the server
stops and starts at known points of the run, not at a race's whim.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from pytorch_lightning import Callback, Trainer

from metalab.cli import main
from metalab.tracking import MLflowTracking
from metalab.tracking.base import RunInfo
from metalab.tracking.client import experiment_id
from metalab.tracking.outbox import HTTP_DEFAULTS
from metalab.tracking.pending import PENDING_ARTIFACTS, PENDING_FILE, PendingFile, PendingInUse
from tests.conftest import BIN, CHECKOUT

MAX_STEPS, LOG_EVERY, VALIDATE_EVERY = 60, 2, 20
HELD_FOR = 300  # seconds a gate waits for the test before it fails the run


class Gate(Callback):
    """Holds training after each step of ``steps``: writes ``<folder>/at-<step>``, then waits for
    ``<folder>/go-<step>`` (the test's word that the server is where it wants it)."""

    def __init__(self, folder: str, steps: list[int]) -> None:
        self.folder, self.steps = Path(folder), list(steps)

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step not in self.steps:
            return
        (self.folder / f"at-{trainer.global_step}").touch()
        deadline = time.monotonic() + HELD_FOR
        while not (self.folder / f"go-{trainer.global_step}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate at step {trainer.global_step}: no word from the test in {HELD_FOR} s")
            time.sleep(0.05)


class Server:
    """The lab's tracking server in ``folder``, on free ports."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.environment = os.environ | {"MLFLOW_PORT": str(free_port()), "POSTGRES_PORT": str(free_port()),
                                         "MLFLOW_WORKERS": "1"}
        self.uri = f"http://127.0.0.1:{self.environment['MLFLOW_PORT']}"

    def start(self) -> None:
        result = subprocess.run([str(CHECKOUT / "scripts" / "tracking_server.sh"), "start", str(self.folder)],
                                env=self.environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == self.uri

    def stop(self) -> None:
        subprocess.run([str(CHECKOUT / "scripts" / "tracking_server.sh"), "stop", str(self.folder)],
                       env=self.environment, capture_output=True, timeout=120, check=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server of this module's own (it is stopped and started), skipped only where PostgreSQL is missing."""
    if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but PostgreSQL is not installed: .ci/run installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql): no tracking server to stop")
    folder = Path(tempfile.mkdtemp(prefix="metalab-outage-", dir="/tmp"))
    folder.chmod(0o755)  # PostgreSQL runs as the postgres user, which must reach its folder
    lab = Server(folder)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(folder, ignore_errors=True)


class Training:
    """A ``metalab-train`` process tracked to ``uri``, held by a :class:`Gate` at ``steps``, writing in ``folder``."""

    def __init__(self, uri: str, folder: Path, steps: list[int], wait_s: float) -> None:
        self.folder, self.experiment = folder, f"metalab-test-outage-{uuid.uuid4().hex[:10]}"
        self.gates = folder / "gates"
        self.gates.mkdir()
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
        environment |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")])),
                        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}  # system metrics flow through the outage
        with (folder / "stdout").open("w") as stdout, (folder / "stderr").open("w") as stderr:
            self.process = subprocess.Popen(
                [str(BIN / "metalab-train"), "debug=smoke", f"trainer.max_steps={MAX_STEPS}",
                 f"trainer.log_every_n_steps={LOG_EVERY}", f"trainer.val_check_interval={VALIDATE_EVERY}",
                 "runner.backend=loop", f"tracking.tracking_uri={uri}", f"tracking.experiment_name={self.experiment}",
                 f"tracking.outage_wait_s={wait_s}", "+callbacks.gate._target_=tests.test_tracking_outage.Gate",
                 f"+callbacks.gate.folder={self.gates}", f"+callbacks.gate.steps=[{','.join(map(str, steps))}]"],
                cwd=folder, env=environment, stdout=stdout, stderr=stderr)
        self.stdout = self.stderr = ""

    def reached(self, step: int) -> None:
        while not (self.gates / f"at-{step}").exists():
            assert self.process.poll() is None, \
                f"the run ended before step {step}: {(self.folder / 'stderr').read_text()[-3000:]}"
            time.sleep(0.05)

    def go(self, step: int) -> None:
        (self.gates / f"go-{step}").touch()

    def finish(self) -> None:
        self.process.wait(timeout=300)
        self.stdout, self.stderr = (self.folder / "stdout").read_text(), (self.folder / "stderr").read_text()

    def run(self, client: MlflowClient) -> Run:
        [run] = client.search_runs([client.get_experiment_by_name(self.experiment).experiment_id])
        return run

    def output_dir(self) -> Path:
        [folder] = self.folder.glob("outputs/*/*")
        return folder


@dataclass
class Outage:
    back: Training  # held again after the outage began until the server was back, then to its end
    down: Training  # ran to its end with the server down


@pytest.fixture(scope="module")
def outage(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Outage:
    """Two runs through one outage that begins at step 20: one sees the server return at step 40, the other ends
    (waiting 2 s for it) while it is down. The server is up again afterwards."""
    back = Training(server.uri, tmp_path_factory.mktemp("back"), [VALIDATE_EVERY, 2 * VALIDATE_EVERY], wait_s=60)
    down = Training(server.uri, tmp_path_factory.mktemp("down"), [VALIDATE_EVERY], wait_s=2)
    back.reached(VALIDATE_EVERY)
    down.reached(VALIDATE_EVERY)
    server.stop()
    back.go(VALIDATE_EVERY)
    down.go(VALIDATE_EVERY)
    down.finish()
    back.reached(2 * VALIDATE_EVERY)  # 20 more steps trained, logged, validated and checkpointed with no server
    server.start()
    back.go(2 * VALIDATE_EVERY)
    back.finish()
    return Outage(back, down)


def history(client: MlflowClient, run: Run, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run.info.run_id, key))


def assert_complete(client: MlflowClient, run: Run) -> None:
    """FINISHED, with every logged step of every metric once, the test's metrics and the validation curve."""
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("metalab.error")
    assert history(client, run, "meta_train/loss") == list(range(LOG_EVERY - 1, MAX_STEPS, LOG_EVERY))
    assert history(client, run, "meta_val/post_loss") == list(range(VALIDATE_EVERY - 1, MAX_STEPS, VALIDATE_EVERY))
    assert history(client, run, "meta_test/post_loss") == [MAX_STEPS]
    system = history(client, run, "system/cpu_utilization_percentage")  # sampled every 0.5 s, outage or not
    assert len(system) >= 4 and system == list(range(len(system)))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/validation_curve.png"]
    # The learner as an MLflow Model goes through the same outbox: stored whole once the server answers.
    assert {"model/MLmodel", "model/artifacts"} <= {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "metalab.tracking_pending" not in run.data.tags


def lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.slow  # ~2 min on 2 cores (3 when busy), mostly the server starting twice: `make test-slow` (CI runs it)
def test_a_server_back_before_the_end_receives_every_record_and_the_run_finishes(server: Server,
                                                                                  outage: Outage) -> None:
    back = outage.back
    assert back.process.returncode == 0, back.stderr[-3000:]
    assert "meta-test over 20 tasks" in back.stdout
    client = MlflowClient(server.uri)
    assert_complete(client, back.run(client))
    down, again = lines(back.stderr)  # one line as the outage begins, one as it ends, and nothing else
    assert down == (f"metalab: warning: tracking server {server.uri} does not take records ([Errno 111] Connection "
                    f"refused): they wait in {back.output_dir() / PENDING_FILE} and are sent when it does; the run "
                    "goes on")
    assert re.fullmatch(f"metalab: tracking server {server.uri} takes records again: the [0-9]+ that waited are sent",
                        again)
    assert not (back.output_dir() / PENDING_FILE).exists() and not (back.output_dir() / PENDING_ARTIFACTS).exists()


@pytest.mark.slow  # shares the outage above: ~30 s more
def test_a_server_down_at_the_end_leaves_the_records_for_metalab_sync(server: Server, outage: Outage) -> None:
    down, output_dir = outage.down, outage.down.output_dir()
    assert down.process.returncode == 0, down.stderr[-3000:]  # training and test completed
    assert "meta-test over 20 tasks" in down.stdout
    waiting = (output_dir / PENDING_FILE).read_text().count("\n")  # one record a line
    assert waiting > MAX_STEPS / LOG_EVERY / 2
    began, left = lines(down.stderr)
    assert began.startswith(f"metalab: warning: tracking server {server.uri} does not take records (")
    assert left == (f"metalab: warning: tracking server {server.uri} did not take the run's last records within 2 s "
                    f"([Errno 111] Connection refused): {waiting} records wait in "
                    f"{output_dir / PENDING_FILE} and the run stays RUNNING there; send them with "
                    f"`metalab sync {output_dir}` once it answers")
    client = MlflowClient(server.uri)
    run = down.run(client)
    assert run.info.status == "RUNNING" and "meta_test/post_loss" not in run.data.metrics

    sync = subprocess.run([str(BIN / "metalab"), "sync", str(output_dir)], capture_output=True, text=True,
                          timeout=300)
    assert sync.returncode == 0, sync.stderr
    # MLflow's own "View run ... at: <address>" lines come first, as when any run ends on a server
    assert sync.stdout.splitlines()[-1] == f"sent {waiting} records to {server.uri}; run {run.info.run_id} is FINISHED"
    assert sync.stderr == ""
    assert_complete(client, run)
    assert not (output_dir / PENDING_FILE).exists() and not (output_dir / PENDING_ARTIFACTS).exists()
    stored = {key: history(client, run, key) for key in client.get_run(run.info.run_id).data.metrics}

    again = subprocess.run([str(BIN / "metalab"), "sync", str(output_dir)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stdout == f"nothing to send: {output_dir} holds no {PENDING_FILE}\n"
    assert {key: history(client, run, key) for key in stored} == stored


# What `metalab sync` does with a pending file, without a server to stop: records written as a run writes them.

def pending_run(folder: Path, uri: str, run_id: str) -> None:
    """A folder left as by a run whose store stopped answering after storing its first loss value."""
    records = PendingFile(folder)
    figure = folder / PENDING_ARTIFACTS / "0123456789ab" / "note.txt"
    figure.parent.mkdir(parents=True)
    figure.write_text("drawn during the run")
    for entries in ({"metrics": [["loss", 0.5, 1000, 1], ["loss", 0.4, 2000, 2]]},
                    {"tags": {"metalab.backend": "loop"}}, {"artifact": str(figure), "artifact_path": "figures"},
                    {"finish": "FINISHED", "end_time": 3000}):
        records.append({"uri": uri, "run": run_id, **entries})
    records.close(0)


def test_sync_stores_what_a_run_left_once_and_ends_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, "outage")).info.run_id
    client.log_batch(run_id, [Metric("loss", 0.5, 1000, 1)])  # stored, but its answer was lost: still pending
    pending_run(tmp_path / "run", uri, run_id)
    main(["sync", str(tmp_path / "run")])
    assert capsys.readouterr().out == f"sent 4 records to {uri}; run {run_id} is FINISHED\n"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == 3000
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.4)]
    assert run.data.tags["metalab.backend"] == "loop"
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/note.txt"]
    assert list((tmp_path / "run").iterdir()) == []  # the file and the figure's copy are gone

    main(["sync", str(tmp_path / "run")])
    assert capsys.readouterr().out == f"nothing to send: {tmp_path / 'run'} holds no {PENDING_FILE}\n"


def test_sync_to_a_server_that_does_not_answer_keeps_every_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in HTTP_DEFAULTS.items():  # sync sets them: undone after the test
        monkeypatch.setenv(name, value)
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens
    pending_run(tmp_path / "run", uri, "0" * 32)
    before = (tmp_path / "run" / PENDING_FILE).read_bytes()
    with pytest.raises(SystemExit) as stopped:
        main(["sync", str(tmp_path / "run")])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        f"metalab: error: tracking server {uri} does not take records ([Errno 111] Connection refused): 0 sent, 4 "
        f"wait in {tmp_path / 'run' / PENDING_FILE}; run `metalab sync {tmp_path / 'run'}` again when it does\n")
    assert (tmp_path / "run" / PENDING_FILE).read_bytes() == before


def test_sync_of_a_folder_a_run_still_holds_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    held = PendingFile(tmp_path)  # as a running job holds its own
    with pytest.raises(PendingInUse, match=r"mlflow_pending.jsonl is in use by another process \(the run still going"):
        PendingFile(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["sync", str(tmp_path)])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (f"metalab: error: {tmp_path / PENDING_FILE} is in use by another process (the "
                                       "run still going, or a `metalab sync` of it): wait for it to end\n")
    held.close(0)
    assert not (tmp_path / PENDING_FILE).exists()


def test_a_resumed_run_first_stores_what_its_killed_process_left_pending(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = MLflowTracking(uri)
    first.start(OmegaConf.create({"seed": 0}), RunInfo("outage", "maml-outage", tmp_path / "out", {}, [])
                ).log_metrics({"meta_train/loss": 2.0}, step=10)
    first.finish("KILLED")
    records = PendingFile(tmp_path / "out")  # what a process killed during an outage leaves
    # meta_train/grad_norm: a key whose every value was still pending when the process died
    records.append({"uri": uri, "run": first.run_id, "metrics": [["meta_train/loss", 1.0, 5000, 30],
                                                                  ["meta_train/grad_norm", 0.5, 5000, 30]]})
    records.close(0)
    (tmp_path / "out" / "checkpoints").mkdir()
    (tmp_path / "out" / "checkpoints" / "last.ckpt").touch()
    second = MLflowTracking(uri)
    logger = second.resume(first.run_id)
    assert logger.logged_steps == {"meta_train/loss": 30, "meta_train/grad_norm": 30}  # not to be logged again
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "meta_train/loss")) == [10, 30]
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.finish("FINISHED")
    assert client.get_run(first.run_id).info.status == "FINISHED" and not (tmp_path / "out" / PENDING_FILE).exists()
