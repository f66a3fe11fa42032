"""Summary statistics reported for few-shot evaluation and for comparisons over seeds: one rule for both.

Every "± x" metalab prints is the half-width of a two-sided 95% confidence interval for a mean,
``t(0.975, n − 1) · s / √n``, with Student's t quantile and ``s`` the sample standard deviation of the n
values. The few-shot literature reports ``1.96 · s / √n`` over its 600–10,000 test tasks; there t is at most
0.2% larger (t(0.975, 599) = 1.9639), e.g. ± 0.401 for a paper's ± 0.40, so metalab's intervals over tasks
compare with theirs. Over a few seeds or tasks they do not agree: t(0.975, 2) = 4.30 and t(0.975, 1) = 12.7,
so 1.96 would give intervals 2–6× too narrow (and 1.2% too narrow over 100 validation tasks). One rule for
every n, rather than a switch at some n, means no interval jumps when a setting crosses a threshold.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

Z_95 = 1.959964  # the standard normal's 97.5% quantile: the large-n limit of t_95, as few-shot papers use
INTERVAL = "95% CI, Student's t with n−1 degrees of freedom"  # what every "±" is, for captions and docs


def t_95(n: int) -> float:
    """Student's t 97.5% quantile with ``n − 1`` degrees of freedom (the 95% two-sided factor for n values);
    NaN for n < 2, where no interval exists."""
    if n < 2:
        return math.nan
    from scipy import stats  # here: importing scipy.stats takes ~0.4 s, and only an interval needs it

    return float(stats.t.ppf(0.975, n - 1))


def ci95_half_width(std: float, n: int) -> float:
    """Half-width of the 95% CI of a mean of ``n`` values whose sample standard deviation is ``std``."""
    return t_95(n) * std / math.sqrt(n) if n >= 2 else math.nan


def mean_and_ci95(values: Tensor) -> tuple[float, float]:
    """Mean of ``values`` (e.g. per-task query accuracy) and the half-width of its 95% CI,
    ``t(0.975, n − 1) · s / √n`` (see the module docstring). For n = 1 the interval is undefined: NaN.
    """
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("mean_and_ci95 needs at least one value")
    mean = values.mean().item()
    if n == 1:
        return mean, math.nan
    return mean, ci95_half_width(values.std(correction=1).item(), n)
