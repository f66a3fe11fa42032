"""The exception types for bad input, and the one-line rendering of any error for the CLI."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration or input. The message names the config key and says how to fix it."""


class DataMissingError(ConfigError):
    """A data set is not where the config points. The message names the data set, the expected layout
    and the key to set (``task.root``); ``metalab-train`` exits with :data:`DATA_MISSING_EXIT_CODE`."""


class SimulatorMissingError(DataMissingError):
    """A simulator a task family needs (MuJoCo) cannot start here. The message names it and how to install it; as for
    a missing data set, ``metalab-train`` exits with :data:`DATA_MISSING_EXIT_CODE`, so ``metalab reproduce all``
    lists the preset as *no data* and goes on."""


DATA_MISSING_EXIT_CODE = 3  # 1: the run failed, 2: bad command line, 3: the data set (or simulator) is missing


def one_line(error: BaseException) -> str:
    """Render an error as one line: our own messages as they are, others prefixed by their type.

    Hydra wraps constructor errors in ``InstantiationException``; the cause is the useful part.
    """
    while error.__cause__ is not None and type(error).__name__ == "InstantiationException":
        error = error.__cause__
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ConfigError):
        return text
    if type(error).__name__ == "MissingMandatoryValue":  # a `???` left in the config
        key = getattr(error, "full_key", "") or "a required key"
        return f"{key} must be set: add {key}=<value> to the command line"
    return f"{type(error).__name__}: {text}"
