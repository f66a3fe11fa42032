"""Start-up time of ``metalab-train``: ``--help``, and a one-step sinusoid run tracked to a fresh ./mlflow.db.

Run: .venv/bin/python benchmarks/startup.py [--repeats 5] [--source DIR] [--top 12]

A sweep of 100 short jobs pays a job's start-up 100 times. Each command runs as a whole process, in an empty
temporary folder, ``--repeats`` times; the best wall time is printed, then where one more run spent its imports:
``python -X importtime``'s self times summed per top-level package (a package's whole import cost, whoever
imported it). ``--source`` measures another checkout's code (its ``platform/`` and ``conf/``), e.g. the main
branch's, with this interpreter. Targets on a 2-core machine: ``--help`` < 2 s, the one-step run < 5 s.
The first run ever also makes the empty MLflow store new stores are copied from (metalab.tracking.client).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "one-step run": ["debug=smoke", "trainer.max_steps=1", "trainer.val_check_interval=1", "task.val_tasks=1",
                     "task.test_tasks=1", "runner.backend=loop"],
}
ENTRY_POINT = "from metalab.train import cli; cli()"  # what the metalab-train console script runs


def environment(source: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "METALAB_"))}
    return env | {"PYTHONPATH": f"{source / 'platform'}{os.pathsep}{source}",
                  "METALAB_CONFIG_DIR": str(source / "conf"),
                  "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}  # ./mlflow.db in the run's empty folder


def cpu_seconds() -> float:
    """CPU time (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(arguments: list[str], env: dict[str, str], python_flags: tuple[str, ...] = ()) -> tuple[float, float, str]:
    """Wall and CPU seconds the command took, and its stderr; in a fresh empty folder, so the store is created
    each time. CPU time is the steadier figure on a machine other processes share."""
    with tempfile.TemporaryDirectory(prefix="metalab-startup-") as folder:
        start, start_cpu = time.perf_counter(), cpu_seconds()
        result = subprocess.run([sys.executable, *python_flags, "-c", ENTRY_POINT, *arguments], cwd=folder, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    if result.returncode != 0:
        raise SystemExit(f"metalab-train {' '.join(arguments)} failed ({result.returncode}):\n{result.stderr}")
    return seconds, cpu, result.stderr


def import_seconds(importtime: str) -> dict[str, float]:
    """``-X importtime``'s self times (microseconds) summed per top-level package, in seconds."""
    per_package: dict[str, float] = collections.defaultdict(float)
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        per_package[name.strip().split(".")[0]] += int(self_us) / 1e6
    return dict(per_package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command; the best is printed")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose platform/ and conf/ run (default: this one)")
    parser.add_argument("--top", type=int, default=12, help="packages listed per command")
    args = parser.parse_args()
    env = environment(args.source.resolve())
    print(f"source {args.source.resolve()}, best of {args.repeats}")
    for label, arguments in COMMANDS.items():
        runs = [run(arguments, env) for _ in range(args.repeats)]
        per_package = import_seconds(run(arguments, env, ("-X", "importtime"))[2])
        print(f"\nmetalab-train {label}: {min(r[0] for r in runs):.2f} s wall, {min(r[1] for r in runs):.2f} s CPU "
              f"(imports {sum(per_package.values()):.2f} s in one more run, -X importtime)")
        for package, seconds in sorted(per_package.items(), key=lambda item: -item[1])[:args.top]:
            print(f"  {seconds:6.2f} s  {package}")


if __name__ == "__main__":
    main()
