"""``metalab``: the platform's verbs besides training (``metalab-train``)."""

from __future__ import annotations

import argparse
import os
import sys

from metalab import compare
from metalab.errors import one_line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="metalab", description="metalab: meta-learning research platform")
    verbs = parser.add_subparsers(dest="verb", required=True)
    compare.add_arguments(verbs.add_parser("compare", help="table and plots of a metric across runs"))
    arguments = parser.parse_args(argv)
    try:
        {"compare": compare.run}[arguments.verb](arguments)
    except Exception as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"metalab: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
