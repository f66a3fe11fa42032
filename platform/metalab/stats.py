"""Summary statistics reported for few-shot evaluation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Z_95 = 1.959964  # two-sided 95% quantile of the standard normal, as few-shot papers report


def mean_and_ci95(values: Tensor) -> tuple[float, float]:
    """Mean over tasks and the half-width of its 95% confidence interval (1.96 · s / √n).

    This is the "± x" of the few-shot literature (e.g. Finn et al. 2017; Snell et al. 2017) with s the
    sample standard deviation over n evaluation tasks. For n = 1 the interval is undefined: NaN.
    """
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("mean_and_ci95 needs at least one value")
    mean = values.mean().item()
    if n == 1:
        return mean, math.nan
    return mean, Z_95 * torch.std(values, correction=1).item() / math.sqrt(n)
