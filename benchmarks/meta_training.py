"""Meta-training speed: the plain learn2learn loop vs metalab (MLflow on, backend=loop) vs metalab (auto).

Run: .venv/bin/python benchmarks/meta_training.py [--repeats 3] [--quick]

For each workload, in one process, interleaved and repeated:
  (a) the plain learn2learn loop (README of the foundation issue: clone → adapt → query loss → backward,
      Adam step; for ProtoNet the plain PyTorch prototype loop),
  (b) metalab's Trainer with MLflow tracking, ``runner.backend=loop``,
  (c) the same with ``runner.backend=auto``,
  (d) (b) without tracking: the tracking overhead is 1 − (b)/(d).
Meta-iterations/s exclude the first (warm-up, and the auto probe); every variant samples its tasks from
the same task family. Prints medians with the spread (min–max), the ratios (b)/(a) and (c)/(a), the
tracking overhead, and the peak resident memory above the baseline while the variant ran (sampled every
5 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import learn2learn as l2l
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import metalab  # noqa: F401  (quiet imports)
from metalab._quiet import quiet_lightning
from metalab.algorithms import MAML, ProtoNet
from metalab.learner import MetaLearner
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner
from metalab.tasks import KanjiHandwriting, SinusoidRegression
from metalab.tasks.base import TaskFamily

PAGE = 4096


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms by a thread."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


@dataclass
class Workload:
    name: str
    family: TaskFamily
    network: Callable[[], torch.nn.Module]
    algorithm: str  # "maml" or "protonet"
    inner_lr: float
    iterations: int


def plain_loop(workload: Workload, iterations: int) -> float:
    """(a): seconds per meta-iteration of the textbook loop."""
    torch.manual_seed(0)
    model = workload.network()
    generator = torch.Generator().manual_seed(0)
    loss_fn = F.cross_entropy if workload.family.problem == "classification" else F.mse_loss
    if workload.algorithm == "maml":
        maml = l2l.algorithms.MAML(model, lr=workload.inner_lr)
        optimizer = torch.optim.Adam(maml.parameters(), 1e-3)
    else:
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    times = []
    for _ in range(iterations + 1):
        start = time.perf_counter()
        tasks = workload.family.sample(workload.family.meta_batch_size, generator, "train")
        optimizer.zero_grad()
        for i in range(len(tasks)):
            if workload.algorithm == "maml":
                learner = maml.clone()
                learner.adapt(loss_fn(learner(tasks.support_x[i]), tasks.support_y[i]))
                loss = loss_fn(learner(tasks.query_x[i]), tasks.query_y[i])
            else:
                embedded = model.features(torch.cat([tasks.support_x[i], tasks.query_x[i]])).flatten(1)
                support, query = embedded[: len(tasks.support_x[i])], embedded[len(tasks.support_x[i]):]
                prototypes = torch.stack([support[tasks.support_y[i] == c].mean(0) for c in
                                          range(int(tasks.support_y[i].max()) + 1)])
                loss = loss_fn(-torch.cdist(query, prototypes).pow(2), tasks.query_y[i])
            (loss / len(tasks)).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.mean(times[1:])


class StepTimer(pl.Callback):
    """Wall time from the start of the second meta-iteration to the end of the last."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.end = time.perf_counter()


def metalab_trainer(workload: Workload, iterations: int, backend: str, store: Path | None) -> tuple[float, str]:
    """(b)/(c): seconds per meta-iteration of metalab's Trainer with MLflow tracking on, and the backend used."""
    from pytorch_lightning.loggers import MLFlowLogger

    torch.manual_seed(0)
    model = workload.network()
    algorithm = MAML(model, inner_lr=workload.inner_lr) if workload.algorithm == "maml" else ProtoNet(model)
    learner = MetaLearner(algorithm, optimizer=lambda p: torch.optim.Adam(p, 1e-3), problem=workload.family.problem,
                          runner=TaskRunner(backend))
    timer = StepTimer()
    # as metalab's tracking does; no store: no tracking at all
    logger = MLFlowLogger(tracking_uri=f"sqlite:///{store}", synchronous=False) if store else False
    trainer = pl.Trainer(max_steps=iterations + 1, logger=logger,
                         callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         log_every_n_steps=50, inference_mode=False, check_val_every_n_epoch=None,
                         accelerator="cpu", devices=1)
    trainer.fit(learner, datamodule=workload.family)  # its train_dataloader and batch transfer, as metalab-train
    return (timer.end - timer.start) / iterations, learner.runner.chosen or "-"


def first_step_seconds() -> float:
    """The smallest complete run from the command line (imports, compose, MLflow run, 1 step, tiny test)."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        command = [str(Path(sys.executable).parent / "metalab-train"), "debug=smoke", "trainer.max_steps=1",
                   "trainer.val_check_interval=1", "task.val_tasks=1", "task.test_tasks=1", "runner.backend=loop"]
        run = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})  # set by (b)
        seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"the command-line run failed:\n{run.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke check of the script)")
    parser.add_argument("--only", help="run only the workloads whose name contains this text, e.g. sinusoid")
    args = parser.parse_args()
    quiet_lightning()
    scale = 0.25 if args.quick else 1.0
    kanji = dict(num_classes=1623, queries=15, eval_batch_size=50)
    workloads = [
        Workload("sinusoid MLP, MAML, 25 tasks K=10", SinusoidRegression(meta_batch_size=25),
                 lambda: MLP(1, (40, 40), 1), "maml", 0.01, int(100 * scale)),
        Workload("CNN4 kanji 5w1s15q, MAML, 16 tasks", KanjiHandwriting(ways=5, shots=1, meta_batch_size=16, **kanji),
                 lambda: CNN4(5), "maml", 0.4, max(2, int(6 * scale))),
        Workload("CNN4 kanji 20w5s15q, ProtoNet, 4 tasks",
                 KanjiHandwriting(ways=20, shots=5, meta_batch_size=4, **kanji),
                 lambda: CNN4(20), "protonet", 0.0, max(2, int(8 * scale))),
    ]
    workloads = [w for w in workloads if args.only is None or args.only in w.name]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for workload in workloads:
            workload.family.prepare()
            seconds: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
            memory: dict[str, float] = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}
            choices: list[str] = []  # what backend=auto chose in each repeat
            for repeat in range(args.repeats):
                for variant in ("a", "b", "c", "d"):
                    with PeakMemory() as peak:
                        if variant == "a":
                            seconds["a"].append(plain_loop(workload, workload.iterations))
                        else:
                            backend = "auto" if variant == "c" else "loop"
                            store = None if variant == "d" else Path(folder) / f"{variant}{repeat}.db"
                            per_iteration, chosen = metalab_trainer(workload, workload.iterations, backend, store)
                            seconds[variant].append(per_iteration)
                            if variant == "c":
                                choices.append(chosen)
                    memory[variant] = max(memory[variant], peak.megabytes)
            rows.append((workload, seconds, memory, choices))

    print(f"\n{'workload':40} {'(a) it/s':>10} {'(b) it/s':>10} {'(c) it/s':>10} {'(b)/(a)':>16} {'(c)/(a)':>16}"
          f" {'tracking':>17}   peak MB a/b/c   (c) chose")
    for workload, seconds, memory, choices in rows:
        rate = {k: [1 / s for s in v] for k, v in seconds.items()}
        ratios = {k: [rate[k][i] / rate["a"][i] for i in range(len(rate["a"]))] for k in ("b", "c")}
        overhead = [1 - rate["b"][i] / rate["d"][i] for i in range(len(rate["d"]))]

        def show(values: list[float]) -> str:
            return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

        print(f"{workload.name:40} {statistics.median(rate['a']):10.2f} {statistics.median(rate['b']):10.2f} "
              f"{statistics.median(rate['c']):10.2f} {show(ratios['b']):>16} {show(ratios['c']):>16} "
              f"{show(overhead):>17}   "
              f"{memory['a']:.0f}/{memory['b']:.0f}/{memory['c']:.0f}   {','.join(choices)}")
    print(f"\nsmallest full run from the command line (imports, compose, MLflow run, 1 step, test): "
          f"{first_step_seconds():.1f} s")


if __name__ == "__main__":
    main()
