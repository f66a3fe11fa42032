"""Sinusoid regression, the toy family of MAML (Finn, Abbeel & Levine, ICML 2017, §5.1)."""

from __future__ import annotations

import math
from typing import Any

import torch

from metalab.errors import ConfigError
from metalab.tasks.base import TaskFamily
from metalab.tasks.episodes import Episodes


class SinusoidRegression(TaskFamily):
    """Tasks y = A·sin(x − φ) with A ~ U[amplitude_min, amplitude_max], φ ~ U[phase_min, phase_max].

    Inputs x ~ U[x_min, x_max]; ``shots`` support and ``queries`` query points per task. The defaults are
    the paper's: A ∈ [0.1, 5], φ ∈ [0, π], x ∈ [−5, 5], K = 10. Tensors are (T, K, 1). ``kwargs``:
    :class:`TaskFamily`'s (meta-batch size, evaluation tasks, seeds).
    """

    name = "sinusoid"
    problem = "regression"
    generator_parameters = ("amplitude", "phase", "x_range")  # the data, for data_description()

    def __init__(self, *, shots: int = 10, queries: int = 10,
                 amplitude_min: float = 0.1, amplitude_max: float = 5.0,
                 phase_min: float = 0.0, phase_max: float = math.pi,
                 x_min: float = -5.0, x_max: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if shots < 1 or queries < 1:
            raise ConfigError(f"task.shots and task.queries must be >= 1, got shots={shots}, queries={queries}")
        for low, high, key in ((amplitude_min, amplitude_max, "amplitude"), (phase_min, phase_max, "phase"),
                               (x_min, x_max, "x")):
            if low > high:
                raise ConfigError(f"task.{key}_min must be <= task.{key}_max, got {low} > {high}")
        self.shots, self.queries = shots, queries
        self.amplitude = (amplitude_min, amplitude_max)
        self.phase = (phase_min, phase_max)
        self.x_range = (x_min, x_max)

    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            low, high = bounds
            return low + (high - low) * torch.rand(shape, generator=generator)

        amplitude = uniform((num_tasks, 1, 1), self.amplitude)
        phase = uniform((num_tasks, 1, 1), self.phase)
        x = uniform((num_tasks, self.shots + self.queries, 1), self.x_range)  # (T, K+Q, 1)
        y = amplitude * torch.sin(x - phase)
        return Episodes(x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:])


class SinusoidLineRegression(SinusoidRegression):
    """A multimodal family: each task is, with probability ½, a sinusoid as above or a line
    y = a·x + b with a, b ~ U[slope_min, slope_max] (the "sinusoid + line" mixture of multimodal
    meta-learning, e.g. Vuorio et al. 2019, MMAML). ``kwargs``: :class:`SinusoidRegression`'s (the sinusoids,
    the points per task) and :class:`TaskFamily`'s."""

    name = "sinusoid_line"
    generator_parameters = (*SinusoidRegression.generator_parameters, "line_fraction", "slope")

    def __init__(self, *, line_fraction: float = 0.5, slope_min: float = -3.0, slope_max: float = 3.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= line_fraction <= 1.0:
            raise ConfigError(f"task.line_fraction must be in [0, 1], got {line_fraction}")
        if slope_min > slope_max:
            raise ConfigError(f"task.slope_min must be <= task.slope_max, got {slope_min} > {slope_max}")
        self.line_fraction, self.slope = line_fraction, (slope_min, slope_max)

    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        tasks = super().sample(num_tasks, generator, split)
        is_line = torch.rand((num_tasks, 1, 1), generator=generator) < self.line_fraction
        low, high = self.slope
        slope, intercept = (low + (high - low) * torch.rand((2, num_tasks, 1, 1), generator=generator))
        tasks.support_y = torch.where(is_line, slope * tasks.support_x + intercept, tasks.support_y)
        tasks.query_y = torch.where(is_line, slope * tasks.query_x + intercept, tasks.query_y)
        return tasks
