"""Per-step speed and memory of the runner's backends against the plain learn2learn loop, on one device.

Run: python benchmarks/backends.py [--device cuda] [--meta-batch-size 32] [--steps 20]

The workload of the README's GPU figures: CNN4 on kanji 5-way 1-shot, 15 queries per class, second-order MAML
(one inner step, α 0.4), a meta-batch of ``--meta-batch-size`` tasks. Each variant takes ``--steps``
meta-iterations after two warm-up ones, each a meta-gradient and an Adam step, timed with the device
synchronised: (a) the plain learn2learn loop (``benchmarks/plain_learn2learn.py``'s), then metalab's
``TaskRunner`` with ``loop``, ``threads`` and ``vmap``. Prints ms per meta-iteration, the ratio against (a),
and the peak device memory (CUDA) of each. This times the step only; ``benchmarks/meta_training.py`` times
whole ``metalab-train`` processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import learn2learn as l2l
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from plain_learn2learn import learn2learn_cnn4, maml_loss  # the baseline (run as a script: its folder is on the path)

from metalab.algorithms import MAML
from metalab.algorithms.base import Context
from metalab.models import CNN4
from metalab.runner import TaskRunner
from metalab.tasks import KanjiHandwriting

INNER_LR = 0.4


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], steps: int, device: torch.device) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` calls after two warm-up calls, and the peak device memory (MB; CUDA only)."""
    for _ in range(2):
        step()
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronise(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-dir", default=None, help="the kanji render cache (task.cache_dir)")
    args = parser.parse_args()
    device = torch.device(args.device)
    family = KanjiHandwriting(ways=5, shots=1, queries=15, meta_batch_size=args.meta_batch_size,
                              cache_dir=args.cache_dir)
    family.prepare()
    generator = torch.Generator().manual_seed(0)
    batches = [family.sample(args.meta_batch_size, generator, "train").to(device) for _ in range(4)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}; CNN4 kanji 5w1s15q, second-order MAML, "
          f"meta-batch {args.meta_batch_size}, {args.steps} meta-iterations each")

    def plain() -> Callable[[], None]:
        torch.manual_seed(0)
        maml = l2l.algorithms.MAML(learn2learn_cnn4(5).to(device), lr=INNER_LR)
        optimizer = torch.optim.Adam(maml.parameters(), 1e-3)
        counter = iter(range(10**9))

        def step() -> None:
            tasks = batches[next(counter) % len(batches)]
            optimizer.zero_grad()
            for i in range(len(tasks)):
                task = (tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i])
                (maml_loss(maml, task, F.cross_entropy, 1) / len(tasks)).backward()
            optimizer.step()
        return step

    def runner(backend: str) -> Callable[[], None]:
        torch.manual_seed(0)
        algorithm = MAML(CNN4(5), inner_lr=INNER_LR).to(device)
        optimizer = torch.optim.Adam(algorithm.meta_parameters(), 1e-3)
        task_runner, context, counter = TaskRunner(backend), Context(F.cross_entropy, training=True), iter(range(10**9))

        def step() -> None:
            optimizer.zero_grad()
            _, loss = task_runner.meta_loss(algorithm, batches[next(counter) % len(batches)], context)
            loss.backward()
            optimizer.step()
        return step

    results: dict[str, tuple[list[float], float]] = {"(a) plain learn2learn": timed(plain(), args.steps, device)}
    for backend in ("loop", "threads", "vmap"):
        try:
            results[f"metalab {backend}"] = timed(runner(backend), args.steps, device)
        except Exception as error:  # e.g. out of memory: say so, go on with the others
            print(f"metalab {backend}: failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    baseline = statistics.median(results["(a) plain learn2learn"][0])
    print(f"\n{'variant':24}{'ms/it median (min–max)':>28}{'vs (a)':>10}{'peak MB':>10}")
    for variant, (seconds, peak) in results.items():
        median = statistics.median(seconds)
        print(f"{variant:24}{median * 1e3:>12.1f} ({min(seconds) * 1e3:.1f}–{max(seconds) * 1e3:.1f}){'':>3}"
              f"{baseline / median:>9.2f}×{peak:>10.0f}")


if __name__ == "__main__":
    main()
