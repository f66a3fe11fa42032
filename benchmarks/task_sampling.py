"""Task-sampling throughput per family, and its share of a CNN4 5-way 1-shot MAML meta-iteration.

Run: .venv/bin/python benchmarks/task_sampling.py [--repeats 7] [--omniglot-root DIR] [--mini-imagenet-root DIR]

Sampling must not be the bottleneck of meta-training: the share printed last must stay below 5%.
Measured in one process, interleaved and repeated; medians with the spread (min–max).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import metalab  # noqa: F401  (quiet imports)
from metalab.algorithms import MAML
from metalab.learner import MetaLearner
from metalab.models import CNN4
from metalab.tasks import KanjiHandwriting, MiniImageNet, Omniglot, SinusoidLineRegression, SinusoidRegression
from metalab.tasks.base import TaskFamily


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def families(args: argparse.Namespace) -> dict[str, TaskFamily]:
    chosen: dict[str, TaskFamily] = {
        "sinusoid (25 tasks, K=10)": SinusoidRegression(),
        "sinusoid_line (25 tasks, K=10)": SinusoidLineRegression(),
        "kanji 5w1s15q (16 tasks)": KanjiHandwriting(ways=5, shots=1, queries=15, meta_batch_size=16),
        "kanji 20w5s15q (16 tasks)": KanjiHandwriting(ways=20, shots=5, queries=15, meta_batch_size=16),
    }
    if args.omniglot_root:
        chosen["omniglot 5w1s15q (32 tasks)"] = Omniglot(root=args.omniglot_root, meta_batch_size=32)
    if args.mini_imagenet_root:
        chosen["mini_imagenet 5w1s15q (4 tasks)"] = MiniImageNet(root=args.mini_imagenet_root, meta_batch_size=4)
    for family in chosen.values():
        family.prepare()
    return chosen


def maml_iteration(family: KanjiHandwriting) -> Callable[[], object]:
    """One second-order MAML meta-iteration on CNN4 (64 channels), inner lr 0.4, one step: the workload."""
    torch.manual_seed(0)
    learner = MetaLearner(MAML(CNN4(5), inner_lr=0.4), optimizer=torch.optim.Adam, problem="classification")
    learner.log = lambda *args, **kwargs: None
    optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
    tasks = family.sample(family.meta_batch_size, torch.Generator().manual_seed(0), "train")

    def step() -> None:
        optimizer.zero_grad()
        learner.training_step(tasks, 0).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=20, help="meta-batches sampled per repeat")
    parser.add_argument("--omniglot-root")
    parser.add_argument("--mini-imagenet-root")
    args = parser.parse_args()

    chosen = families(args)
    generator = torch.Generator().manual_seed(0)
    samples: dict[str, list[float]] = {name: [] for name in chosen}
    kanji = chosen["kanji 5w1s15q (16 tasks)"]
    iteration = maml_iteration(kanji)
    iteration()  # warm-up
    iterations: list[float] = []
    for _ in range(args.repeats):  # interleaved: every family, then the workload, each repeat
        for name, family in chosen.items():
            seconds = timed(lambda f=family: [f.sample(f.meta_batch_size, generator, "train")
                                              for _ in range(args.batches)])
            samples[name].append(seconds / args.batches)
        iterations.append(timed(iteration))

    print(f"{'family':34} {'meta-batch/s':>13} {'tasks/s':>10}   spread (tasks/s)")
    for name, family in chosen.items():
        per_batch = statistics.median(samples[name])
        rates = [family.meta_batch_size / s for s in samples[name]]
        print(f"{name:34} {1 / per_batch:13.1f} {family.meta_batch_size / per_batch:10.0f}   "
              f"{min(rates):.0f}–{max(rates):.0f}")
    sampling = statistics.median(samples["kanji 5w1s15q (16 tasks)"])
    step = statistics.median(iterations)
    share = sampling / (sampling + step)
    print(f"\nCNN4 5-way 1-shot MAML meta-iteration (16 tasks): {step * 1000:.0f} ms "
          f"(spread {min(iterations) * 1000:.0f}–{max(iterations) * 1000:.0f} ms)")
    print(f"sampling its meta-batch: {sampling * 1000:.1f} ms = {share:.1%} of a meta-iteration "
          f"({'OK' if share < 0.05 else 'TOO SLOW'}: must stay below 5%)")


if __name__ == "__main__":
    main()
