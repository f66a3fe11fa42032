"""A run's write-ahead file of tracking records, ``<output dir>/mlflow_pending.jsonl``, and how they are sent.

Every record a run writes to its MLflow store goes into this file first, one JSON object a line: metrics
(key, value, timestamp, step), params, tags, an artifact (the path of its local copy, kept in
``<output dir>/mlflow_pending/`` until stored; a folder, such as the run's MLflow Model in ``<output dir>/model``,
is sent whole and kept), a registration of the run's model (:mod:`metalab.tracking.registry`) and the run's end
(status, end time). The run's outbox
(:mod:`metalab.tracking.outbox`) sends them from there and drops them once the store holds them, so what a
tracking outage keeps from the store waits in the file: the run sends it when the store answers again, and
``metalab sync <output dir>`` sends what a run left behind. Each record names its store and run::

    {"uri": "http://127.0.0.1:5000", "run": "4f0c...", "metrics": [["meta_train/loss", 0.71, 1767268800000, 5]]}
    {"uri": "http://127.0.0.1:5000", "run": "4f0c...", "artifact": "<output dir>/mlflow_pending/1a2b/inner_loop.png",
     "artifact_path": null}
    {"uri": "http://127.0.0.1:5000", "run": "4f0c...", "register": "kanji-maml", "tags": {"meta_test/post_acc": "0.91"}}
    {"uri": "http://127.0.0.1:5000", "run": "4f0c...", "finish": "FINISHED", "end_time": 1767268860000}
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from metalab.errors import ConfigError, one_line
from metalab.figures import VALIDATION_CURVE, validation_curve
from metalab.tracking.registry import register_version

PENDING_FILE = "mlflow_pending.jsonl"
PENDING_ARTIFACTS = "mlflow_pending"  # local copies of artifacts not stored yet (figures drawn during the run)
PENDING_TAG = "metalab.tracking_pending"  # on a run whose store refused records: what waits, and the command
READ_LINES = 5000  # records read from the file at a time

Record = dict[str, Any]


class PendingInUse(ConfigError):
    """Another process (the run itself, or a ``metalab sync``) holds the folder's pending file."""


class PendingFile:
    """The write-ahead file of one output folder, held by one process at a time (an advisory lock).

    Records are appended at the end and read from a byte offset; :meth:`drop` forgets the records before an
    offset once the store holds them all, :meth:`close` keeps only those it does not hold.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / PENDING_FILE
        self.artifacts = folder / PENDING_ARTIFACTS
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            self._file = open(self.path, "a+b")  # appends land at the end whatever the read offset
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                raise PendingInUse(f"{self.path} is in use by another process (the run still going, or a "
                                   "`metalab sync` of it): wait for it to end") from None
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino:
                break
            self._file.close()  # the holder before us replaced or removed the file before we locked it: reopen
        self._lock = threading.Lock()  # the training thread appends while the outbox's thread reads
        self._stored: list[Path] = []  # artifacts' local copies already stored, deleted with their records

    def append(self, record: Record) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._file.write(line)
            self._file.flush()  # to the kernel: kept if the process dies (fsync would slow every logged step)

    def read(self, offset: int) -> list[tuple[int, Record]]:
        """The records from ``offset`` on (up to :data:`READ_LINES`), each with the offset just past it."""
        lines: list[bytes] = []
        with self._lock:
            self._file.seek(offset)
            # Up to the end, or to a line cut off when a process was killed mid-write.
            while len(lines) < READ_LINES and (line := self._file.readline()).endswith(b"\n"):
                lines.append(line)
        records = []
        for line in lines:
            try:
                records.append((offset + len(line), json.loads(line)))
            except ValueError:
                raise ConfigError(f"{self.path}: the line at byte {offset} is no record (not JSON): "
                                  "mend or delete it") from None
            offset += len(line)
        return records

    def stored(self, artifacts: list[Path]) -> None:
        """``artifacts``' local copies are in the store: delete them once their records are dropped."""
        self._stored += artifacts

    def drop(self, offset: int) -> bool:
        """Empty the file if the store holds every record (``offset`` is its end); whether it did."""
        with self._lock:
            if offset < self._file.seek(0, os.SEEK_END):
                return False
            self._file.truncate(0)
        self._delete_stored()
        return True

    def count(self, offset: int = 0) -> int:
        """How many records the file holds from ``offset`` on."""
        with self._lock:
            self._file.seek(offset)
            return self._file.read().count(b"\n")

    def close(self, offset: int) -> int:
        """Keep only the records from ``offset`` on (none: the file goes); release the file; return how many."""
        with self._lock:
            self._file.seek(offset)
            rest = self._file.read()
            rest = rest[:rest.rfind(b"\n") + 1]  # a line cut off mid-write is no record
            if not rest:
                self.path.unlink()
            elif offset:
                spare = self.path.with_suffix(".tmp")
                spare.write_bytes(rest)
                os.replace(spare, self.path)  # under the lock: a reader sees the old file or the new one
            self._file.close()
        self._delete_stored()
        if self.artifacts.is_dir() and not any(self.artifacts.iterdir()):
            self.artifacts.rmdir()
        return rest.count(b"\n")

    def _delete_stored(self) -> None:
        for path in self._stored:
            if path.parent.parent.resolve() == self.artifacts.resolve():  # a copy the outbox made, in its own folder
                shutil.rmtree(path.parent, ignore_errors=True)
        self._stored = []


def groups(lines: list[tuple[int, Record]]) -> Iterator[tuple[int, list[Record]]]:
    """Consecutive records that go to the store in one batch (same store and run, within MLflow's limits),
    each group with the offset past its last record; an artifact, a registration or a run's end goes alone."""
    group: list[Record] = []
    size = end = 0
    for offset, record in lines:
        entries = sum(len(record.get(kind, ())) for kind in ("metrics", "params", "tags"))
        joins = (_is_data(record) and _is_data(group[-1]) and record["uri"] == group[-1]["uri"]
                 and record["run"] == group[-1]["run"] and size + entries <= MAX_ENTITIES_PER_BATCH) if group else True
        if not joins:
            yield end, group
            group, size = [], 0
        group.append(record)
        size, end = size + entries, offset
    if group:
        yield end, group


def _is_data(record: Record) -> bool:
    return not ({"artifact", "register", "finish"} & record.keys())


class Sender:
    """Sends groups of records to the stores they name (or all to ``tracking_uri``), in order.

    ``verify``: a send that failed may still have been stored (only its answer was lost), and a file left
    behind holds records sent before the process ended, so metric values the store already holds (same key,
    step, timestamp and value) are dropped first; params, tags, artifacts and the run's end can be sent twice, and a
    registration sent twice finds the run's version.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self._clients: dict[str, MlflowClient] = {}
        self._held: dict[tuple[str, str, str], set[tuple[int, int, float | None]]] = {}

    def forget(self) -> None:
        """Drop what was read of the stores' metric histories (the next verified send reads them again)."""
        self._held.clear()

    def send(self, group: list[Record], verify: bool) -> list[Path]:
        """Send one group (see :func:`groups`); return the local artifact copies now stored."""
        first = group[0]
        uri, run = self.tracking_uri or first["uri"], first["run"]
        client = self._clients.get(uri) or self._clients.setdefault(uri, MlflowClient(uri))
        if "artifact" in first:
            path = Path(first["artifact"])
            if path.is_dir():  # the run's model folder: its files under artifact_path
                client.log_artifacts(run, str(path), first.get("artifact_path"))
            else:
                client.log_artifact(run, str(path), first.get("artifact_path"))
            return [path]
        if "register" in first:
            register_version(client, first["register"], run, first.get("tags", {}))
            return []
        if "finish" in first:
            finish_run(client, run, first["finish"], first.get("end_time"))
            return []
        metrics = [(key, float(value), int(timestamp), int(step))
                   for record in group for key, value, timestamp, step in record.get("metrics", ())]
        params = {key: value for record in group for key, value in record.get("params", {}).items()}
        tags = {key: value for record in group for key, value in record.get("tags", {}).items()}
        if verify:
            metrics = self._not_held(client, uri, run, metrics)
        for batch in _batches([Metric(*m) for m in metrics], [Param(*p) for p in params.items()],
                              [RunTag(*t) for t in tags.items()]):
            client.log_batch(run, *batch)
        if verify:
            for key, value, timestamp, step in metrics:
                self._held[uri, run, key].add(_identity(step, timestamp, value))
        return []

    def _not_held(self, client: MlflowClient, uri: str, run: str,
                  metrics: list[tuple[str, float, int, int]]) -> list[tuple[str, float, int, int]]:
        fresh, seen = [], set()
        for key, value, timestamp, step in metrics:
            if (uri, run, key) not in self._held:
                self._held[uri, run, key] = {_identity(m.step, m.timestamp, m.value)
                                             for m in client.get_metric_history(run, key)}
            identity = (key, *_identity(step, timestamp, value))
            if identity[1:] not in self._held[uri, run, key] and identity not in seen:
                fresh.append((key, value, timestamp, step))
                seen.add(identity)
        return fresh


def _identity(step: int, timestamp: int, value: float) -> tuple[int, int, float | None]:
    return step, timestamp, None if math.isnan(value) else value  # NaN never equals itself


def _batches(metrics: list[Metric], params: list[Param],
             tags: list[RunTag]) -> Iterator[tuple[list[Metric], list[Param], list[RunTag]]]:
    """``log_batch`` arguments within MLflow's limits (100 params, 100 tags, 1000 entities a call)."""
    while metrics or params or tags:
        some_params, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
        some_tags, tags = tags[:MAX_PARAMS_TAGS_PER_BATCH], tags[MAX_PARAMS_TAGS_PER_BATCH:]
        room = MAX_ENTITIES_PER_BATCH - len(some_params) - len(some_tags)
        yield metrics[:room], some_params, some_tags
        metrics = metrics[room:]


def finish_run(client: MlflowClient, run_id: str, status: str, end_time: int | None = None) -> None:
    """End a run: draw its whole ``meta_val/*`` history (a resumed run's earlier validations included) as
    :data:`~metalab.figures.VALIDATION_CURVE` (nothing if it never validated), clear :data:`PENDING_TAG`,
    set ``status``."""
    run = client.get_run(run_id)
    history = {name.removeprefix("meta_val/"): {metric.step: metric.value
                                                for metric in client.get_metric_history(run_id, name)}
               for name in run.data.metrics if name.startswith("meta_val/")}
    figure = validation_curve(history)
    if figure is not None:
        client.log_figure(run_id, figure, VALIDATION_CURVE)
    if PENDING_TAG in run.data.tags:
        client.delete_tag(run_id, PENDING_TAG)
    client.set_terminated(run_id, status, end_time)


def reason(error: BaseException) -> str:
    """Why a store did not take a record, in a few words: ``[Errno 111] Connection refused``, ``too many 503
    error responses``, or the error's own line (cut to 200 characters)."""
    text = " ".join(str(error).split())
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text) or re.search(r"Caused by \w+\('([^']*)'", text)
    if found:
        return (found.group(1) if found.groups() else found.group(0)).strip()
    return one_line(error)[:200]


def refused(error: BaseException) -> bool:
    """Whether the store answered and refused (HTTP 4xx), rather than not answering or failing (5xx)."""
    return isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500
