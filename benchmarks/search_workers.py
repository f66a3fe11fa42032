"""Wall time of one Optuna search of N trials run by 1, 2, 4 ... `metalab-train` workers sharing its study.

Run: .venv/bin/python benchmarks/search_workers.py [--trials 12] [--steps 200] [--workers 1 2 4] [--storage URL]

Each round starts W worker processes together, as a lab would (terminals, machines, a job array), all naming one
fresh study of ``--trials`` trials (``hparams_search=maml_optuna debug=smoke``, ``--steps`` meta-iterations each) in
``--storage`` (default: a SQLite file in a temporary folder; give the tracking server's PostgreSQL with
``scripts/tracking_server.sh study-storage DIR``), tracked to a SQLite MLflow store. It prints, per W, the
wall time from the first start to the last exit, the trials each worker ran, and the speed-up over one worker
measured in the same invocation. A worker pays Python's start-up once and then ~1-4 s a trial, so on a machine
with C cores the speed-up stops growing past C workers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TRIAL = ["hparams_search=maml_optuna", "debug=smoke", "algorithm.inner_steps=1", "hydra/sweeper/pruner=none"]


def search(workers: int, trials: int, steps: int, storage: str | None, folder: Path) -> tuple[float, list[int]]:
    """Seconds from starting ``workers`` processes on one fresh study to the last one's exit, and the number of
    trials each ran."""
    name = f"bench-{workers}-{int(time.time())}"
    storage = storage or f"sqlite:///{folder}/study.db"
    command = [str(BIN / "metalab-train"), *TRIAL, f"hydra.sweeper.storage={storage}",
               f"hydra.sweeper.study_name={name}", f"hydra.sweeper.n_trials={trials}", f"trainer.max_steps={steps}",
               f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db", f"tracking.experiment_name={name}"]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    processes = [subprocess.Popen([*command, f"hydra.sweep.dir={folder}/{name}/{i}"], cwd=folder, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    outputs = [process.communicate() for process in processes]
    seconds = time.perf_counter() - start
    for process, (_out, err) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise SystemExit(f"a worker failed ({process.returncode}):\n{err}")
    ran = [len(re.findall(r"Launching 1 jobs locally", out)) for out, _ in outputs]
    if sum(ran) != trials:
        raise SystemExit(f"the workers ran {sum(ran)} trials, not {trials}")
    return seconds, ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200, help="meta-iterations a trial")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--storage", default=None, help="a SQLAlchemy URL (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    print(f"{args.trials} trials of {args.steps} steps (hparams_search=maml_optuna debug=smoke), {os.cpu_count()} CPUs")
    print("| workers | wall time | trials per worker | speed-up over 1 worker |\n|---|---|---|---|")
    baseline = None
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="metalab-search-") as folder:
            seconds, ran = search(workers, args.trials, args.steps, args.storage, Path(folder))
        if workers == 1:
            baseline = seconds
        speedup = f"{baseline / seconds:.2f}x" if baseline else "-"
        print(f"| {workers} | {seconds:.1f} s | {', '.join(map(str, ran))} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
