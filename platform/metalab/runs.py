"""``metalab runs``: the RUNNING runs of a store, live or stale (their process is gone); ``--stale`` lists only
the stale ones, ``--mark-killed`` closes those as KILLED. How a run is judged: :mod:`metalab.tracking.liveness`.

A stale run can still be continued: ``metalab-train resume=<run id>`` (from its ``last.ckpt``), KILLED or not.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from metalab.errors import ConfigError
from metalab.tracking.liveness import STALE_AFTER, find_runs, mark_killed
from metalab.tracking.runs import RunStore
from metalab.tracking.uri import DEFAULT_TRACKING_URI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI}")
    parser.add_argument("--experiment", action="append", dest="experiments", help="repeatable; default: all")
    parser.add_argument("--stale", action="store_true", help="only runs whose process is gone")
    parser.add_argument("--mark-killed", action="store_true", help="set the stale runs' status to KILLED")
    parser.add_argument("--older-than", type=float, default=STALE_AFTER.total_seconds() / 60, metavar="MINUTES",
                        help="a run of another host is stale after this long without a heartbeat (default: "
                             "%(default)g); on this host, a run is stale when its process is gone")


def run(arguments: argparse.Namespace) -> None:
    if arguments.older_than <= 0:
        raise ConfigError(f"--older-than must be > 0 minutes, got {arguments.older_than:g}")
    store = RunStore(arguments.tracking_uri)
    runs = find_runs(store, arguments.experiments, timedelta(minutes=arguments.older_than))
    shown = [r for r in runs if r.stale] if arguments.stale or arguments.mark_killed else runs
    if not shown:
        print(f"no {'stale' if arguments.stale or arguments.mark_killed else 'running'} runs in {store.tracking_uri}")
        return
    for r in shown:
        print(f"{r.run_id}  {r.experiment}/{r.name}  {'stale' if r.stale else 'live'}: {r.reason}")
    if arguments.mark_killed:
        mark_killed(store.client, shown)
        print(f"marked {len(shown)} stale run{'s' * (len(shown) != 1)} KILLED "
              "(metalab-train resume=<run id> continues one)")
