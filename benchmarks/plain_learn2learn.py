"""The baseline of ``benchmarks/meta_training.py``: the plain learn2learn loop, as one process.

Written as learn2learn's README writes MAML (clone → adapt → query loss → ``backward()`` per task, an Adam
step per meta-batch; for ProtoNet the plain PyTorch prototype loop), then meta-tested on ``--test-tasks``
tasks. Sinusoid tasks are drawn here with torch alone (the distribution of ``task=sinusoid``), so the
process imports torch and learn2learn only; kanji tasks come from metalab's family (its rendered glyphs),
which imports Lightning too.

Run: python benchmarks/plain_learn2learn.py sinusoid --steps 2000 --test-tasks 10
Prints one JSON line: seconds of start-up (process start → first step), meta-training and test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import learn2learn as l2l
import psutil
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # support x, support y, query x, query y; tasks first


def sinusoid_tasks(count: int, generator: torch.Generator, shots: int = 10, queries: int = 10) -> Batch:
    """Amplitude U[0.1, 5], phase U[0, π], x U[-5, 5] (Finn et al. 2017, as ``task=sinusoid``)."""
    amplitude = 0.1 + 4.9 * torch.rand(count, 1, 1, generator=generator)
    phase = math.pi * torch.rand(count, 1, 1, generator=generator)
    x = -5 + 10 * torch.rand(count, shots + queries, 1, generator=generator)
    y = amplitude * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def learn2learn_cnn4(ways: int) -> nn.Module:
    """learn2learn's own CNN4 for 28×28 grey images, as metalab's ``model=cnn4`` builds it (64 channels, four
    conv → batch norm → ReLU → max-pool blocks, a linear head), without metalab's faster pooling."""
    return l2l.vision.models.CNN4(ways, hidden_size=64, layers=4, channels=1, max_pool=True, embedding_size=64)


def maml_loss(maml: l2l.algorithms.MAML, task: Batch, loss_fn: Callable[..., Tensor], steps: int) -> Tensor:
    support_x, support_y, query_x, query_y = task
    learner = maml.clone()
    for _ in range(steps):
        learner.adapt(loss_fn(learner(support_x), support_y))
    return loss_fn(learner(query_x), query_y)


def protonet_loss(model: nn.Module, task: Batch) -> Tensor:
    support_x, support_y, query_x, query_y = task
    embedded = model.features(torch.cat([support_x, query_x])).flatten(1)
    support, query = embedded[: len(support_x)], embedded[len(support_x):]
    prototypes = torch.stack([support[support_y == c].mean(0) for c in range(int(support_y.max()) + 1)])
    return F.cross_entropy(-torch.cdist(query, prototypes).pow(2), query_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=("sinusoid", "kanji-maml", "kanji-protonet"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test-tasks", type=int, default=10)
    parser.add_argument("--meta-batch-size", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if args.workload == "sinusoid":
        model, loss_fn, inner_lr, steps = mlp(), F.mse_loss, 0.01, 1  # metalab's defaults
        batch_size = args.meta_batch_size or 25

        def draw(count: int, split: str) -> Batch:
            return sinusoid_tasks(count, generator)
    else:
        from metalab.tasks import KanjiHandwriting

        ways, shots = (5, 1) if args.workload == "kanji-maml" else (20, 5)
        family = KanjiHandwriting(ways=ways, shots=shots, meta_batch_size=args.meta_batch_size or 16)
        family.prepare()
        model, loss_fn, inner_lr, steps = learn2learn_cnn4(ways), F.cross_entropy, 0.4, 1
        batch_size = family.meta_batch_size

        def draw(count: int, split: str) -> Batch:
            tasks = family.sample(count, generator, split)
            return tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y

    protonet = args.workload == "kanji-protonet"
    maml = None if protonet else l2l.algorithms.MAML(model, lr=inner_lr)
    optimizer = torch.optim.Adam(model.parameters() if protonet else maml.parameters(), 1e-3)

    def task_loss(batch: Batch, index: int) -> Tensor:
        task = tuple(part[index] for part in batch)
        return protonet_loss(model, task) if protonet else maml_loss(maml, task, loss_fn, steps)

    start = time.perf_counter()
    startup = time.time() - psutil.Process().create_time()
    for _ in range(args.steps):
        batch = draw(batch_size, "train")
        optimizer.zero_grad()
        for index in range(batch_size):
            (task_loss(batch, index) / batch_size).backward()
        optimizer.step()
    meta_train = time.perf_counter() - start

    start = time.perf_counter()
    batch = draw(args.test_tasks, "test")
    losses = [task_loss(batch, index).item() for index in range(args.test_tasks)]
    test = time.perf_counter() - start
    print(json.dumps({"startup": startup, "meta_train": meta_train, "validation": 0.0, "test": test,
                      "steps": args.steps, "test_loss": sum(losses) / len(losses)}))


if __name__ == "__main__":
    main()
