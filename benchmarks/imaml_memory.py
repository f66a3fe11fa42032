"""Memory and time of one meta-gradient: iMAML (implicit, CG) vs second-order MAML (unrolled), by inner steps.

Run: .venv/bin/python benchmarks/imaml_memory.py [--steps 1 5 20] [--repeats 3] [--threads N]

CNN4 (64 channels) on 5-way 1-shot 28×28 images, 15 queries per class, meta-batch 4 (random images: the memory
and time of a meta-gradient do not depend on what the pixels show). Both algorithms run through
``TaskRunner("loop")``, which takes each task's meta-gradient before adapting the next, as in training.

Each configuration runs in a fresh process (memory freed by one run stays with the process, so a second run
in it would allocate nothing new). Per configuration: the best wall time of ``--repeats`` meta-gradients after
the first, and two memory figures:

- ``peak MB``: during the first meta-gradient, the peak above the level before it: on a GPU
  ``torch.cuda.max_memory_allocated``; on a CPU the resident memory sampled every 5 ms (``PeakMemory`` of
  benchmarks/meta_training.py: coarse, it includes one-time buffers of the convolution library);
- ``graph MB``: the peak of the bytes held by autograd graphs (the distinct storages saved for backward),
  counted by ``torch.autograd.graph.saved_tensors_hooks``: exact and repeatable on any device.

iMAML keeps one support graph (for its Hessian-vector products), whatever the inner steps; MAML keeps every
inner step's graph for the backward through the unrolled loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import torch
import torch.nn.functional as F
from torch import Tensor

import metalab  # noqa: F401  (quiet imports)
from metalab.algorithms import IMAML, MAML, Context, MetaAlgorithm
from metalab.models import CNN4
from metalab.runner import TaskRunner
from metalab.tasks import Episodes

MB = 2**20


class GraphMemory:
    """Peak bytes of the distinct tensor storages that autograd graphs hold for backward, while active."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage address → [bytes, graph references]
        self.current = self.peak = 0

    def _pack(self, tensor: Tensor) -> _Saved:
        return _Saved(self, tensor)

    def _add(self, storage: torch.UntypedStorage) -> None:
        entry = self.live.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]

    @contextmanager
    def measuring(self) -> Iterator[GraphMemory]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor):
            yield self


class _Saved:
    """A tensor saved for backward; its graph reference ends when autograd frees it."""

    def __init__(self, meter: GraphMemory, tensor: Tensor) -> None:
        self.meter, self.tensor = meter, tensor
        storage = tensor.untyped_storage()
        self.address = storage.data_ptr()
        meter._add(storage)

    def __del__(self) -> None:
        self.meter._release(self.address)


class PeakResident:
    """This process's resident memory, sampled every 5 ms by a thread while the block runs: ``base`` at entry,
    ``peak`` the highest seen (the exit's included)."""

    def __enter__(self) -> PeakResident:
        self._process = psutil.Process()
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """``result["bytes"]``: peak memory above the level at entry (CUDA allocator, or resident memory on CPU)."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        with PeakResident() as sampler:
            yield result
        result["bytes"] = sampler.peak - sampler.base


def timed_with_graph(work: Callable[[], None], repeats: int) -> tuple[float, float]:
    """The best of ``repeats`` timed calls of ``work`` (seconds), then one more measured by
    :class:`GraphMemory` (the peak bytes of its autograd graph)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    meter = GraphMemory()
    with meter.measuring():
        work()
    return min(seconds), meter.peak


@dataclasses.dataclass
class Measurement:
    seconds: float
    graph_bytes: int
    peak_bytes: float


def random_tasks(count: int, ways: int, shots: int, queries: int, image_size: int, device: torch.device) -> Episodes:
    generator = torch.Generator().manual_seed(0)

    def images(per_class: int) -> Tensor:
        return torch.rand(count, ways * per_class, 1, image_size, image_size, generator=generator).to(device)

    def labels(per_class: int) -> Tensor:
        return torch.arange(ways).repeat_interleave(per_class).expand(count, -1).to(device)

    return Episodes(images(shots), labels(shots), images(queries), labels(queries))


def build(name: str, inner_steps: int, ways: int, image_size: int, hidden_size: int) -> MetaAlgorithm:
    torch.manual_seed(0)
    model = CNN4(ways, image_size=image_size, hidden_size=hidden_size)
    if name == "imaml":  # the paper's Omniglot settings: λ = 2, 5 CG steps
        return IMAML(model, inner_lr=0.1, inner_steps=inner_steps, reg_lambda=2.0, cg_steps=5)
    return MAML(model, inner_lr=0.4, inner_steps=inner_steps)  # MAML's Omniglot step size, second order


def measure(name: str, inner_steps: int, *, meta_batch: int = 4, ways: int = 5, shots: int = 1, queries: int = 15,
            image_size: int = 28, hidden_size: int = 64, repeats: int = 3, device: str = "cpu",
            resident: bool = True) -> Measurement:
    """One meta-gradient (meta-loss and backward, through ``TaskRunner("loop")``) of ``name`` (``imaml`` or
    ``maml``) with ``inner_steps``: peak memory of the first (meaningful in a fresh process only;
    ``resident=False``: not sampled on a CPU, e.g. in tests), best time of the next ``repeats``, graph bytes."""
    where = torch.device(device)
    algorithm = build(name, inner_steps, ways, image_size, hidden_size).to(where)
    tasks = random_tasks(meta_batch, ways, shots, queries, image_size, where)
    runner, context = TaskRunner("loop"), Context(F.cross_entropy, training=True)

    def meta_gradient() -> None:
        algorithm.zero_grad(set_to_none=True)
        _, loss = runner.meta_loss(algorithm, tasks, context)
        loss.backward()
        if where.type == "cuda":
            torch.cuda.synchronize(where)

    peak = float("nan")
    if resident or where.type == "cuda":
        with peak_memory(where) as result:
            meta_gradient()
        peak = result["bytes"]
    else:
        meta_gradient()  # warm-up
    seconds, graph = timed_with_graph(meta_gradient, repeats)
    return Measurement(seconds, graph, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op CPU threads")
    parser.add_argument("--one", nargs=2, metavar=("ALGORITHM", "STEPS"), help=argparse.SUPPRESS)  # a child's run
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        result = measure(args.one[0], int(args.one[1]), repeats=args.repeats, device=args.device)
        print(json.dumps(dataclasses.asdict(result)))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; CNN4-64 5-way 1-shot 15 queries, meta-batch 4; one meta-gradient")
    lines = ["| algorithm | inner steps | time s | peak MB | graph MB |", "|---|---|---|---|---|"]
    for name, label in (("imaml", "iMAML (CG 5)"), ("maml", "MAML (2nd order)")):
        for steps in args.steps:
            command = [sys.executable, __file__, "--one", name, str(steps), "--repeats", str(args.repeats),
                       "--device", args.device, "--threads", str(args.threads)]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            result = Measurement(**json.loads(child.stdout.strip().splitlines()[-1]))
            lines.append(f"| {label} | {steps} | {result.seconds:.3f} | {result.peak_bytes / MB:.1f} | "
                         f"{result.graph_bytes / MB:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
