"""Memory and time of a second-order MAML meta-iteration, with and without ``algorithm.inner_checkpointing``.

Run: .venv/bin/python benchmarks/inner_checkpointing.py [--steps 1 5 10] [--meta-batch 2] [--repeats 2]

CNN4 (64 channels, batch norm) on kanji 5-way 1-shot tasks, 15 queries per class (``KanjiHandwriting``, rendered
once into the user's cache), inner step 0.4 (MAML's Omniglot value), ``TaskRunner("loop")`` as in training: each
task's meta-gradient is taken before the next task is adapted. A meta-iteration is the meta-loss, its backward and
an Adam step on one meta-batch drawn beforehand.

Each configuration runs in a fresh process (memory one run freed stays with the process). Per configuration:

- ``time s``: the best of ``--repeats`` meta-iterations after the measured first one;
- ``peak MB``: the first meta-iteration's peak above the level before it (after one plain forward and backward
  that sets up the convolution library's buffers): ``torch.cuda.max_memory_allocated`` on a GPU, else the resident
  memory sampled every 5 ms (coarse; the allocator keeps some freed memory);
- ``graph MB``: the peak bytes of the tensors autograd graphs hold for backward (``saved_tensors_hooks``, exact and
  repeatable on any device). With checkpointing this leaves out the one step that the outer backward recomputes at
  a time (checkpoint holds those tensors itself): the peak above shows that part.

The target of issue 17: with checkpointing, 10 inner steps' peak memory at most 1.5× that of 1 step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from imaml_memory import MB, peak_memory, timed_with_graph  # benchmarks/ is on sys.path when run as a script

import metalab  # noqa: F401  (quiet imports)
from metalab.algorithms import MAML, Context
from metalab.models import CNN4
from metalab.runner import TaskRunner
from metalab.tasks import KanjiHandwriting


@dataclasses.dataclass
class Measurement:
    seconds: float
    peak_bytes: float
    graph_bytes: int


def measure(inner_steps: int, checkpointing: bool, meta_batch: int, repeats: int, device: str) -> Measurement:
    """One configuration's numbers (meaningful in a fresh process only: see the module docstring)."""
    where = torch.device(device)
    family = KanjiHandwriting(ways=5, shots=1, queries=15, meta_batch_size=meta_batch)
    tasks = family.sample(meta_batch, torch.Generator().manual_seed(0), "train").to(where)
    torch.manual_seed(0)
    algorithm = MAML(CNN4(5), inner_lr=0.4, inner_steps=inner_steps, inner_checkpointing=checkpointing).to(where)
    optimizer = torch.optim.Adam(algorithm.parameters(), 1e-3)
    runner, context = TaskRunner("loop"), Context(F.cross_entropy, training=True)

    def meta_iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, loss = runner.meta_loss(algorithm, tasks, context)
        loss.backward()
        optimizer.step()
        if where.type == "cuda":
            torch.cuda.synchronize(where)

    F.cross_entropy(algorithm.model(tasks.query_x[0]), tasks.query_y[0]).backward()  # set-up, not measured
    algorithm.zero_grad(set_to_none=True)
    with peak_memory(where) as peak:
        meta_iteration()
    seconds, graph = timed_with_graph(meta_iteration, repeats)
    return Measurement(seconds, peak["bytes"], graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--meta-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, type=int, metavar=("STEPS", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child's run: one configuration, its numbers as JSON
        steps, checkpointing = args.one
        print(json.dumps(dataclasses.asdict(measure(steps, bool(checkpointing), args.meta_batch, args.repeats,
                                                    args.device))))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; second-order MAML, CNN4-64 (batch norm), kanji 5-way 1-shot "
          f"15 queries, meta-batch {args.meta_batch}, backend loop; one meta-iteration")
    results: dict[tuple[int, bool], Measurement] = {}
    for steps in args.steps:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--one", str(steps), str(int(checkpointing)), "--meta-batch",
                       str(args.meta_batch), "--repeats", str(args.repeats), "--device", args.device]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            results[steps, checkpointing] = Measurement(**json.loads(child.stdout.strip().splitlines()[-1]))
    lines = ["| inner steps | checkpointing | time s | peak MB | graph MB |", "|---|---|---|---|---|"]
    for (steps, checkpointing), result in results.items():
        lines.append(f"| {steps} | {'on' if checkpointing else 'off'} | {result.seconds:.2f} | "
                     f"{result.peak_bytes / MB:.1f} | {result.graph_bytes / MB:.1f} |")
    print("\n".join(lines))
    first, last = min(args.steps), max(args.steps)
    for checkpointing in (False, True):
        low, high = results[first, checkpointing], results[last, checkpointing]
        print(f"checkpointing {'on' if checkpointing else 'off'}: {last} steps / {first} step: peak "
              f"{high.peak_bytes / low.peak_bytes:.2f}×, graph {high.graph_bytes / low.graph_bytes:.2f}×, "
              f"time {high.seconds / low.seconds:.2f}×")
    for steps in args.steps:
        off, on = results[steps, False], results[steps, True]
        print(f"{steps} steps: checkpointing costs {on.seconds / off.seconds:.2f}× the time for "
              f"{on.peak_bytes / off.peak_bytes:.2f}× the peak memory")


if __name__ == "__main__":
    main()
