"""Meta-training speed as users get it: ``metalab-train`` with its defaults vs the plain learn2learn loop.

Run: .venv/bin/python benchmarks/meta_training.py [--repeats 3] [--quick] [--only sinusoid]

Every variant is a whole process, run in a fresh temporary folder, the variants interleaved and repeated:
  (a) the plain learn2learn loop (``benchmarks/plain_learn2learn.py``),
  (b) ``metalab-train`` as a user runs it: progress bar drawn in a terminal (a pseudo-terminal here),
      checkpoints, MLflow tracking to ./mlflow.db, ``runner.backend=auto`` (its probe included),
  (c) (b) with ``runner.backend=loop``,
  (d) (b) without progress bar, checkpoints and tracking: their cost is 1 − (d)/(b) of (b)'s meta-training time.
Each process reports its phases (``metalab-train``'s ``took`` line; the plain loop's JSON): start-up (process
start → first meta-iteration), meta-training, validation, test. Printed per workload, medians (min–max):
meta-iterations/s of meta-training ("per step"), whole-process seconds, the ratios against (a) of both,
the overhead of (b)'s extras, evaluation's share of (b)'s wall time, and each variant's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
PLAIN = Path(__file__).with_name("plain_learn2learn.py")
TOOK = re.compile(r"^took ([\d.]+) s: start-up ([\d.]+) s, meta-training ([\d.]+) s(?: \(\d+ it/s\))?, "
                  r"validation ([\d.]+) s, test ([\d.]+) s", re.MULTILINE)
BARE = ["trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false", "callbacks=none", "tracking=none"]


@dataclass
class Workload:
    name: str
    plain: list[str]  # arguments of plain_learn2learn.py
    metalab: list[str]  # overrides of metalab-train
    steps: int


@dataclass
class Phases:
    startup: float
    meta_train: float
    validation: float
    test: float
    wall: float  # the whole process, as the benchmark timed it
    peak_mb: float  # its peak resident memory


@dataclass
class Results:
    runs: dict[str, list[Phases]] = field(default_factory=lambda: {v: [] for v in "abcd"})
    chosen: list[str] = field(default_factory=list)  # what backend=auto chose in each repeat


def run_process(command: list[str], folder: Path, terminal: bool) -> tuple[str, float, float]:
    """Run ``command`` in ``folder``; its output (through a pseudo-terminal when ``terminal``), wall seconds
    and peak resident MB (sampled every 20 ms)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"COLUMNS": "120"}
    if terminal:
        controller, worker = pty.openpty()
        stdout = worker
    else:
        stdout = subprocess.PIPE
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, stdout=stdout, stderr=subprocess.PIPE, env=env)
    reader = controller if terminal else process.stdout.fileno()
    if terminal:
        os.close(worker)
    output, peak = bytearray(), 0
    watched = psutil.Process(process.pid)
    while True:
        ready, _, _ = select.select([reader], [], [], 0.02)
        if ready:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # the pseudo-terminal closed: the process ended
                chunk = b""
            if not chunk:
                break
            output += chunk
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    process.wait()
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode()
    if terminal:
        os.close(reader)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-2000:]}")
    return output.decode(errors="replace"), seconds, peak / 2**20


def metalab_phases(output: str, wall: float, peak: float) -> Phases:
    match = TOOK.search(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output))
    if match is None:
        raise SystemExit(f"no 'took' line in metalab-train's output:\n{output[-2000:]}")
    _, startup, meta_train, validation, test = map(float, match.groups())
    return Phases(startup, meta_train, validation, test, wall, peak)


def run_variant(variant: str, workload: Workload, folder: Path) -> tuple[Phases, str]:
    """One process of ``variant`` (a–d) in ``folder``; its phases and the backend it ran."""
    if variant == "a":
        output, wall, peak = run_process([sys.executable, str(PLAIN), *workload.plain], folder, terminal=False)
        phases = json.loads(output.strip().splitlines()[-1])
        return Phases(phases["startup"], phases["meta_train"], 0.0, phases["test"], wall, peak), "-"
    overrides = [*workload.metalab, *(["runner.backend=loop"] if variant == "c" else []),
                 *(BARE if variant == "d" else [])]
    output, wall, peak = run_process([str(BIN / "metalab-train"), *overrides], folder, terminal=variant != "d")
    chosen = re.search(r"runner backend: (\w+) \(chosen by runner.backend=auto\)", output)
    return metalab_phases(output, wall, peak), chosen.group(1) if chosen else "-"


def show(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(workload: Workload, results: Results) -> None:
    runs = results.runs
    rate = {v: [workload.steps / p.meta_train for p in runs[v]] for v in "abcd"}
    pairs = range(len(runs["a"]))
    print(f"\n{workload.name}: {workload.steps} meta-iterations; (b) chose {', '.join(results.chosen)}")
    print(f"  {'':24}{'(a) plain':>24}{'(b) metalab':>24}{'(c) loop':>24}{'(d) bare':>24}")
    print(f"  {'meta-training it/s':24}" + "".join(f"{show(rate[v]):>24}" for v in "abcd"))
    print(f"  {'whole process s':24}" + "".join(f"{show([p.wall for p in runs[v]], 1):>24}" for v in "abcd"))
    print(f"  {'start-up s':24}" + "".join(f"{show([p.startup for p in runs[v]], 1):>24}" for v in "abcd"))
    print(f"  {'validation + test s':24}"
          + "".join(f"{show([p.validation + p.test for p in runs[v]], 1):>24}" for v in "abcd"))
    print(f"  {'peak MB':24}" + "".join(f"{statistics.median(p.peak_mb for p in runs[v]):>24.0f}" for v in "abcd"))
    print(f"  (b)/(a) meta-training: {show([rate['b'][i] / rate['a'][i] for i in pairs])}, "
          f"whole process: {show([runs['a'][i].wall / runs['b'][i].wall for i in pairs])}")
    print(f"  (c)/(a) meta-training: {show([rate['c'][i] / rate['a'][i] for i in pairs])}, "
          f"whole process: {show([runs['a'][i].wall / runs['c'][i].wall for i in pairs])}")
    overhead = [100 * (1 - runs["d"][i].meta_train / runs["b"][i].meta_train) for i in pairs]
    print(f"  progress bar + checkpoints + tracking: {show(overhead, 1)}% of (b)'s meta-training time")
    print(f"  evaluation (validation + test): {show([100 * (p.validation + p.test) / p.wall for p in runs['b']], 1)}%"
          " of (b)'s wall time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer meta-iterations (a check of the script)")
    parser.add_argument("--only", help="run only the workloads whose name contains this text, e.g. sinusoid")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    sinusoid, kanji = max(20, int(2000 * scale)), max(3, int(60 * scale))
    evaluation = ["task.val_tasks=10", "task.test_tasks=10"]
    workloads = [
        Workload("sinusoid MLP 1-40-40-1, MAML, 25 tasks K=10", ["sinusoid", f"--steps={sinusoid}"],
                 [f"trainer.max_steps={sinusoid}", *evaluation], sinusoid),
        Workload("CNN4 kanji 5w1s15q, MAML, 16 tasks", ["kanji-maml", f"--steps={kanji}"],
                 ["task=kanji", f"trainer.max_steps={kanji}", "algorithm.inner_lr=0.4", *evaluation], kanji),
        Workload("CNN4 kanji 20w5s15q, ProtoNet, 4 tasks", ["kanji-protonet", f"--steps={kanji}"],
                 ["task=kanji", "algorithm=protonet", "task.ways=20", "task.shots=5", "task.meta_batch_size=4",
                  f"trainer.max_steps={kanji}", *evaluation], kanji),
    ]
    workloads = [w for w in workloads if args.only is None or args.only in w.name]
    import torch  # after the processes' environment is set; only for the line below

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    for workload in workloads:
        workload.plain.append("--test-tasks=10")  # as the overrides' task.test_tasks
        results = Results()
        for _ in range(args.repeats):
            for variant in "abcd":
                with tempfile.TemporaryDirectory() as folder:
                    phases, chosen = run_variant(variant, workload, Path(folder))
                results.runs[variant].append(phases)
                if variant == "b":
                    results.chosen.append(chosen)
        report(workload, results)


if __name__ == "__main__":
    main()
