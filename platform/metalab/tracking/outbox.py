"""A run's writes to its MLflow store, off the training thread, through outages of the store.

MLflow's asynchronous logging retries a failed batch for minutes (a urllib3 warning at each retry), then drops
it ("Failed to log run data"), and the run's end blocks on the same retries. Here every write is appended to
the run's write-ahead file (:mod:`metalab.tracking.pending`) and sent by a background thread. When the store
does not take a record, the thread says so in one line, keeps the records in the file and tries again every
:data:`RETRY_EVERY_S` seconds; when it takes them again, one line says so. The run's end waits for the store
a bounded time (``tracking.outage_wait_s``); what the store still lacks then waits in the file, and one line
gives the ``metalab sync <output dir>`` that sends it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from metalab.tracking.pending import PENDING_TAG, PendingFile, Sender, groups, reason, refused

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RETRY_EVERY_S = 5.0  # between attempts while the store does not take records
# Records are sent at most this often (the run's end sends at once). Each send is a store transaction and
# Python work in MLflow's SQLAlchemy store whatever its size: sent as they came (every 50 steps), the 40 sends of
# a 2000-step sinusoid run took about 0.6 s of CPU (py-spy) beside its 10 s of meta-training on 2 cores.
SEND_EVERY_S = 2.0
# MLflow's defaults (7 retries with exponential backoff, 120 s timeouts) hold one call for minutes; the outbox
# retries on its own, so a call gives up in seconds. A value already set in the environment wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class _DropRetrying(logging.Filter):
    """urllib3 warns at each retry of a request ("Retrying (Retry(total=1, ...)) after connection broken by
    ..."): an outage is said once, by the outbox or ``metalab sync``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying (")


def fail_fast() -> None:
    """MLflow calls of this process give up in seconds (:data:`HTTP_DEFAULTS`), without a warning per retry."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    pool = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _DropRetrying) for f in pool.filters):
        pool.addFilter(_DropRetrying())


def store_name(tracking_uri: str) -> str:
    kind = "server" if tracking_uri.startswith(("http://", "https://")) else "store"
    return f"tracking {kind} {tracking_uri}"


def say(line: str) -> None:
    print(f"metalab: {line}", file=sys.stderr, flush=True)


class Outbox:
    """Sends run ``run_id``'s records to ``tracking_uri`` from a background thread (batched, at most every
    :data:`SEND_EVERY_S` seconds), through ``<folder>/mlflow_pending.jsonl``; :attr:`client` is the
    ``MlflowClient`` whose run writes go through it.

    Records an earlier process left in the file are sent first, before the constructor returns (a resumed run
    counts the steps its store holds after it). ``close`` ends the run and waits up to ``wait_s`` seconds for a
    store that does not answer.

    Example:
        outbox = Outbox("http://127.0.0.1:5000", run_id, output_dir, wait_s=30)
        outbox.client.log_batch(run_id, metrics=[Metric("loss", 0.5, timestamp, 3)])  # returns at once
        outbox.close("FINISHED")  # the validation curve and the status, after every record before them
    """

    def __init__(self, tracking_uri: str, run_id: str, folder: Path, wait_s: float) -> None:
        if tracking_uri.startswith(("http://", "https://")):
            fail_fast()
        self.tracking_uri, self.run_id, self.wait_s = tracking_uri, run_id, wait_s
        self.file = PendingFile(folder)
        self.client = BufferedClient(self)
        self._sender = Sender()
        self._offset = 0  # the file's records before it are stored
        self._verify = False  # some records past the offset may be stored already (see Sender)
        self._down: str | None = None  # why the store does not take records, during an outage
        self._refused = False  # the last failure was the store's answer (HTTP 4xx), not its silence
        self._sent_late = 0  # records sent since the outage began
        self._wake = threading.Event()  # a record was appended, or the run ends
        self._closing = threading.Event()
        self._closed_at = 0.0
        if self.file.count():  # an earlier process of this output folder left records
            self._verify = True
            self._send_pending()
        self._thread = threading.Thread(target=self._run, name="metalab-outbox", daemon=True)
        self._thread.start()

    def put(self, run_id: str, **entries: Any) -> None:
        """Append a record (``metrics=``, ``params=``, ``tags=``, ``artifact=``, ``finish=``; see
        :mod:`~metalab.tracking.pending`) for the thread to send."""
        self.file.append({"uri": self.tracking_uri, "run": run_id, **entries})
        self._wake.set()

    def close(self, status: str) -> None:
        """End the run with ``status`` once the store holds every record before; say what waits if it does not."""
        self.put(self.run_id, finish=status, end_time=int(time.time() * 1000))
        self._closed_at = time.monotonic()
        self._closing.set()
        self._wake.set()
        self._thread.join()
        left = self.file.close(self._offset)
        if not left:
            return
        command = f"metalab sync {self.file.folder}"
        if self._refused:  # the store answers but refuses a record: the run can still say what waits
            try:
                MlflowClient(self.tracking_uri).set_tag(self.run_id, PENDING_TAG,
                                                        f"{left} records in {self.file.path}: run {command}")
            except Exception:  # the line below says it all the same
                pass
        why = f" ({self._down})" if self._down else ""
        say(f"warning: {store_name(self.tracking_uri)} did not take the run's last records within {self.wait_s:g} s"
            f"{why}: {left} records wait in {self.file.path} and the run stays RUNNING there; send them with "
            f"`{command}` once it answers")

    def _run(self) -> None:
        while True:
            sent_at = time.monotonic()
            if self._send_pending():
                if self._closing.is_set():
                    return
                self._wake.wait()
                self._wake.clear()
                self._closing.wait(max(0.0, sent_at + SEND_EVERY_S - time.monotonic()))  # gather a larger batch
            elif self._down is None:
                continue  # more records came meanwhile
            elif not self._closing.is_set():
                self._closing.wait(RETRY_EVERY_S)  # cut short when the run ends: one more try right away
            elif time.monotonic() - self._closed_at < self.wait_s:  # the run has ended: try until its wait is over
                time.sleep(min(RETRY_EVERY_S, max(0.0, self._closed_at + self.wait_s - time.monotonic())))
            else:
                return

    def _send_pending(self) -> bool:
        """Send the file's records from the offset on; whether the store holds them all (the file is empty).
        A record the store does not take stays, and the outage begins."""
        try:
            while lines := self.file.read(self._offset):
                for end, group in groups(lines):
                    self.file.stored(self._sender.send(group, verify=self._verify))
                    self._offset = end
                    self._sent_late += len(group)
        except Exception as error:  # the store is down or refuses: every record stays in the file
            self._verify, self._refused = True, refused(error)
            if self._down is None:
                self._down, self._sent_late = reason(error), 0
                say(f"warning: {store_name(self.tracking_uri)} does not take records ({self._down}): they wait in "
                    f"{self.file.path} and are sent when it does; the run goes on")
            return False
        if self._down is not None:
            say(f"{store_name(self.tracking_uri)} takes records again: the {self._sent_late} that waited are sent")
            self._down = None
        if not self.file.drop(self._offset):
            return False
        self._offset = 0
        self._verify = False  # nothing past the offset can be in the store
        self._sender.forget()
        return True


class BufferedClient(MlflowClient):
    """An ``MlflowClient`` whose run writes (``log_batch``, ``set_tag``, ``log_figure``) go through an
    :class:`Outbox`: they return at once and never fail for the store. Reads and other writes are MLflow's."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__(outbox.tracking_uri)
        self._outbox = outbox

    def log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
                  tags: Sequence[RunTag] = (), synchronous: bool | None = None) -> None:
        entries: dict[str, Any] = {}
        if metrics:  # float(): numpy's float32 is no JSON number
            entries["metrics"] = [[m.key, float(m.value), int(m.timestamp), int(m.step)] for m in metrics]
        if params:
            entries["params"] = {p.key: str(p.value) for p in params}
        if tags:
            entries["tags"] = {t.key: str(t.value) for t in tags}
        if entries:
            self._outbox.put(run_id, **entries)

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        self._outbox.put(run_id, tags={key: str(value)})

    def log_figure(self, run_id: str, figure: Figure, artifact_file: str, *,
                   save_kwargs: dict[str, Any] | None = None) -> None:
        """Saved now, in a folder of its own under ``<output dir>/mlflow_pending/`` (the caller closes the figure;
        the same name logged twice keeps both), and uploaded by the outbox."""
        path = self._outbox.file.artifacts / uuid.uuid4().hex[:12] / Path(artifact_file).name
        path.parent.mkdir(parents=True)
        figure.savefig(path, **(save_kwargs or {}))
        folder = Path(artifact_file).parent.as_posix()
        self._outbox.put(run_id, artifact=str(path), artifact_path=None if folder == "." else folder)


def system_monitor(client: MlflowClient, run_id: str, resume: bool, tracking_uri: str) -> Any:
    """MLflow's system-metrics monitor of run ``run_id``, writing through ``client`` and stopped by its
    ``finish()`` alone (``resume``: continuing the run's steps). Raises ImportError without ``psutil``."""
    # Imported here: the module imports psutil, an optional dependency of MLflow.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            """MLflow's loop without its read of the run's status after every sample: an outage fails that read,
            which ends MLflow's monitor for the rest of the run."""
            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    if self._shutdown_event.wait(self.sampling_interval):
                        return
                self.publish_metrics(self.aggregate_metrics())

    monitor = Monitor(run_id, resume_logging=resume, tracking_uri=tracking_uri)
    monitor.mlflow_logger.client = client
    return monitor
