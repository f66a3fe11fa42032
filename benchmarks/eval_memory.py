"""Peak memory of a mini-ImageNet-shaped evaluation: the test tasks drawn up front vs drawn batch by batch.

Run: .venv/bin/python benchmarks/eval_memory.py [--tasks 600] [--eval-batch-size 20]

A synthetic image family shaped as mini-ImageNet's test split (20 classes, 84×84 RGB, 5-way 1-shot 15 queries;
100 images a class, so the data itself is ~42 MB) serves ``--tasks`` test tasks. Each variant runs in a fresh
process and reports its peak resident memory (``ru_maxrss``) after iterating every batch:
  up front:  ``family.sample(tasks, ...)`` then sliced into batches (how evaluation drew them before);
  lazily:    ``metalab.tasks.base.FixedTasks``, each batch drawn when asked for (what evaluation does now).
A third process that only imports and builds the family gives the baseline both include.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = ("baseline", "up front", "lazily")


def measure(variant: str, tasks: int, eval_batch_size: int) -> None:
    """In this process: build the family, iterate the test tasks as ``variant`` does, print peak RSS (MB)."""
    import resource

    import torch

    from metalab.tasks.base import FixedTasks
    from metalab.tasks.images import ImageClassFamily, LabelledImages

    class MiniImageNetShaped(ImageClassFamily):
        name = "mini_imagenet_shaped"

        def load_split(self, split: str) -> LabelledImages:
            generator = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (20 * 100, 3, 84, 84), dtype=torch.uint8, generator=generator)
            return LabelledImages(images, torch.arange(20).repeat_interleave(100), [f"class{c}" for c in range(20)])

    family = MiniImageNetShaped(ways=5, shots=1, queries=15, channels=3, test_tasks=tasks,
                                eval_batch_size=eval_batch_size)
    family.prepare()
    checksum = 0.0
    if variant == "up front":
        every = family.sample(tasks, torch.Generator().manual_seed(1002), "test")
        for start in range(0, tasks, eval_batch_size):
            checksum += float(every[start:start + eval_batch_size].query_x.mean())
    elif variant == "lazily":
        for batch in FixedTasks(family, "test", tasks, offset=2):
            checksum += float(batch.query_x.mean())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "peak_mb": peak_mb, "checksum": checksum}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--eval-batch-size", type=int, default=20)  # conf/task/mini_imagenet.yaml's
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.variant:
        measure(args.variant, args.tasks, args.eval_batch_size)
        return
    task_mb = (5 + 75) * 3 * 84 * 84 * 4 / 2**20
    print(f"{args.tasks} test tasks of 5-way 1-shot 15 queries, 84x84 RGB float ({task_mb:.1f} MB a task, "
          f"{args.tasks * task_mb / 1024:.1f} GB in all), eval_batch_size {args.eval_batch_size}")
    peaks = {}
    for variant in VARIANTS:
        output = subprocess.run([sys.executable, __file__, "--variant", variant, "--tasks", str(args.tasks),
                                 "--eval-batch-size", str(args.eval_batch_size)],
                                check=True, capture_output=True, text=True).stdout
        peaks[variant] = json.loads(output.strip().splitlines()[-1])["peak_mb"]
        print(f"  {variant:9} peak resident {peaks[variant]:8.0f} MB   "
              f"(+{peaks[variant] - peaks['baseline']:.0f} MB over building the family)")


if __name__ == "__main__":
    main()
