"""``metalab``: the platform's verbs besides training (``metalab-train``)."""

from __future__ import annotations

import argparse
import os
import sys

from metalab import compare, reproduce, runs, sync
from metalab._quiet import quiet_lightning
from metalab.errors import DATA_MISSING_EXIT_CODE, DataMissingError, one_line
from metalab.serving import adapt


def main(argv: list[str] | None = None) -> None:
    quiet_lightning()
    parser = argparse.ArgumentParser(prog="metalab", description="metalab: meta-learning research platform")
    verbs = parser.add_subparsers(dest="verb", required=True)
    compare.add_arguments(verbs.add_parser("compare", help="table and plots of a metric across runs"))
    reproduce.add_arguments(verbs.add_parser("reproduce", help="run a paper's preset and state the gap to its number"))
    runs.add_arguments(verbs.add_parser("runs", help="running runs, live or stale (process gone); --mark-killed"))
    sync.add_arguments(verbs.add_parser("sync", help="store what a run left pending while its tracking store was down"))
    adapt.add_arguments(verbs.add_parser("adapt", help="adapt a run's learner to images in folders; print the queries' "
                                                       "classes"))
    arguments, extra = parser.parse_known_args(argv)
    if arguments.verb == "reproduce" and all("=" in arg and not arg.startswith("-") for arg in extra):
        arguments.overrides += extra  # Hydra overrides may follow the options: reproduce NAME --budget smoke a=b
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        verb = {"adapt": adapt.run, "compare": compare.run, "reproduce": reproduce.run, "runs": runs.run,
                "sync": sync.run}
        verb[arguments.verb](arguments)
    except Exception as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"metalab: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(DATA_MISSING_EXIT_CODE if isinstance(error, DataMissingError) else 1) from None


if __name__ == "__main__":
    main()
