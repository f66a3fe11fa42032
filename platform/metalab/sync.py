"""``metalab sync <output dir>``: store what a run could not record during a tracking outage.

A run whose store stopped answering leaves the records it did not take in ``<output dir>/mlflow_pending.jsonl``
(:mod:`metalab.tracking.pending`) and its run RUNNING; sync sends them in order, skipping metric values the
store already holds, and ends the run as it ended (status, end time, validation curve). A second sync finds
nothing to send.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metalab.errors import ConfigError
from metalab.tracking.outbox import fail_fast, store_name
from metalab.tracking.pending import PENDING_FILE, PendingFile, Sender, groups, reason


class StoreUnavailable(ConfigError):
    """The store does not take the records; the message says what still waits and how to send it later."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path,
                        help=f"the run's output folder, which holds {PENDING_FILE} (the run's tag metalab.output_dir)")
    parser.add_argument("--tracking-uri", help="send to this store, not the one the records name (the server moved)")


def run(arguments: argparse.Namespace) -> None:
    folder: Path = arguments.output_dir
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: give the run's output folder (its tag metalab.output_dir)")
    if not (folder / PENDING_FILE).is_file():
        print(f"nothing to send: {folder} holds no {PENDING_FILE}")
        return
    sent, uri, ended = sync(folder, arguments.tracking_uri)
    print(f"sent {sent} records to {uri}" + "".join(f"; run {run_id} is {status}" for run_id, status in ended))


def sync(folder: Path, tracking_uri: str | None = None) -> tuple[int, str, list[tuple[str, str]]]:
    """Send ``folder``'s pending records (to ``tracking_uri`` if given, else to the stores they name); return how
    many, the last store, and the runs ended as ``(run id, status)``. Raises :class:`StoreUnavailable`, keeping
    the records not sent."""
    fail_fast()
    pending = PendingFile(folder)
    sender = Sender(tracking_uri)
    offset, sent, uri, ended = 0, 0, tracking_uri or "", []
    try:
        while lines := pending.read(offset):
            for end, group in groups(lines):
                uri = tracking_uri or group[0]["uri"]
                pending.stored(sender.send(group, verify=True))
                offset, sent = end, sent + len(group)
                if "finish" in group[0]:
                    ended.append((group[0]["run"], group[0]["finish"]))
    except ConfigError:
        pending.close(offset)
        raise
    except Exception as error:  # the store is down or refuses: what was not sent stays in the file
        left = pending.close(offset)
        raise StoreUnavailable(f"{store_name(uri)} does not take records ({reason(error)}): {sent} sent, {left} "
                               f"wait in {pending.path}; run `metalab sync {folder}` again when it does") from None
    pending.close(offset)
    return sent, uri, ended
