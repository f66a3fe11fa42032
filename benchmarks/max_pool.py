"""The max-pool of metalab's CNN4 against learn2learn's ReLU then ``MaxPool2d``, on a CPU.

Run: .venv/bin/python benchmarks/max_pool.py [--threads 1] [--repeats 50]

Times, in ms (median of ``--repeats``), torch's max-pool on the (N, C, H, W) layout and on the channels-last one,
then a conv block's ReLU + max-pool as learn2learn computes it and as ``metalab.models.conv.PoolThenReLU`` does:
the forward, and the forward with a differentiable backward (``create_graph``, as MAML's inner step), on the
first block's output of a 75-query CNN4 task (75×64×28×28) and the second's (75×64×14×14).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from metalab.models.conv import PoolThenReLU


def milliseconds(work: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def learn2learn_relu_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.relu(x), 2)  # learn2learn's ConvBlock: relu, then MaxPool2d(2)


def row(shape: tuple[int, ...], repeats: int) -> list[float]:
    """The six timings of one input shape."""
    ours = PoolThenReLU(2)
    x = torch.randn(shape, requires_grad=True)
    channels_last = x.detach().contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2)

    def with_backward(block: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(block(x), x, upstream, create_graph=True)

    return [milliseconds(lambda: F.max_pool2d(x.detach(), 2, return_indices=True), repeats),
            milliseconds(lambda: F.max_pool2d(channels_last, 2, return_indices=True), repeats),
            milliseconds(lambda: learn2learn_relu_max_pool(x), repeats), milliseconds(lambda: ours(x), repeats),
            milliseconds(with_backward(learn2learn_relu_max_pool), repeats), milliseconds(with_backward(ours), repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths = (11, 11, 9, 10, 13, 14)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms, median of {args.repeats}")
    print(f"{'input':>16}{'pool NCHW':>11}{'pool NHWC':>11}{'l2l fwd':>9}{'ours fwd':>10}"
          f"{'l2l fwd+bwd':>13}{'ours fwd+bwd':>14}")
    for shape in [(75, 64, 28, 28), (75, 64, 14, 14)]:
        cells = "".join(f"{value:>{width}.2f}" for value, width in zip(row(shape, args.repeats), widths, strict=True))
        print(f"{'×'.join(map(str, shape)):>16}{cells}")


if __name__ == "__main__":
    main()
