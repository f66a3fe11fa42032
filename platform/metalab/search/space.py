"""A search space written as Hydra sweep overrides, as Optuna distributions.

``hydra.sweeper.params`` (and the command line) say what to search in Hydra's own sweep syntax:
``choice(a, b)`` (categorical), ``range(1, 5)`` (integers 1..4, Hydra's meaning: the stop is excluded),
``interval(0.001, 0.5)`` (uniform floats), ``tag(log, interval(...))`` (log-uniform).
A plain value (``algorithm.inner_steps=1``) is fixed: passed to every trial, not searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, Transformer

from metalab.errors import ConfigError

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


@dataclass
class SearchSpace:
    """The searched keys' distributions and the fixed overrides every trial gets."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's command-line overrides: its sampled ``params``, then the fixed values."""
        return [*(f"{key}={value}" for key, value in params.items()), *self.fixed]


def search_space(arguments: list[str]) -> SearchSpace:
    """Parse ``key=<sweep>`` overrides (``hydra.sweeper.params`` first, then the command line's)."""
    space = SearchSpace()
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            space.distributions[key] = distribution(override)
            space.fixed = [o for o in space.fixed if not o.startswith(f"{key}=")]
        else:  # a later plain value replaces an earlier search of the same key
            space.distributions.pop(key, None)
            space.fixed.append(f"{key}={override.get_value_element_as_str()}")
    return space


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, Glob):  # a choice over the group's options, which only a config loader knows
        raise ConfigError(f"{override.input_line}: Optuna cannot search a glob; name the options in choice(...)")
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            raise ConfigError(f"{key}: range() of floats cannot be searched; use interval({value.start}, "
                              f"{value.stop}) or choice(...)")
        count = math.ceil((value.stop - value.start) / value.step) if value.step > 0 else 0
        last = value.start + (count - 1) * value.step  # the largest below the stop: Hydra's range excludes it
        if count < 1:
            raise ConfigError(f"{key}=range({value.start}, {value.stop}) holds no value")
        return IntDistribution(int(value.start), int(last), step=int(value.step))
    if override.is_interval_sweep():  # Hydra reads an interval's ends as floats, always
        return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
    raise ConfigError(f"{override.input_line}: Optuna searches choice(), range() or interval() only")
