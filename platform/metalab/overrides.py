"""Check command-line overrides by composing the config once, and say what is wrong in one line.

Hydra reports composition errors over several lines (with its search path and OmegaConf's object
types); a user needs the key, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from metalab.config import config_dir

LIST_KEYS_HINT = "`metalab-train --cfg job` prints every key"


def check_overrides(args: list[str]) -> str | None:
    """The one-line problem with these overrides, or ``None`` when they compose.

    Flags (``--multirun``, ``--cfg``, ``--help`` ...) are Hydra's to handle: such command lines pass.
    """
    flags = [arg for arg in args if arg.startswith("-")]
    overrides = [arg for arg in args if not arg.startswith("-")]
    if flags:  # Hydra handles --multirun, --cfg, --help ...; a sweep's syntax is still checked here
        if {"-m", "--multirun"} & set(flags):
            try:
                OverridesParser.create().parse_overrides(overrides)
            except OverrideParseException as error:
                return describe(error)
        return None
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = compose("config", overrides=args, return_hydra_config=True)
        except Exception as error:  # any composition failure is reported, not raised
            return describe(error)
    return check_writable(Path(str(cfg.hydra.run.dir)))


def check_writable(run_dir: Path) -> str | None:
    """Hydra creates the job's output folder; say so in one line if it cannot."""
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        return (f"cannot create the output folder {run_dir} ({error.strerror} in {existing}): set hydra.run.dir "
                "to a writable folder")
    return None


def describe(error: BaseException) -> str:
    if isinstance(error, MissingConfigException):
        found = re.search(r"Could not find '([^/']+)/([^']+)'", str(error))
        options = [option for option in error.options or [] if not option.endswith("_schema")]
        if found and options:
            group, option = found.groups()
            return f"unknown {group} '{option}': choose one of {', '.join(options)} ({group}=<option>)"
    if isinstance(error, OverrideParseException):
        return f"{_first_line(error)}: write overrides as key=value (e.g. algorithm.inner_lr=0.05)"
    cause = error.__cause__
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        return f"unknown config key '{cause.full_key}': {_suggest(cause)}"
    if isinstance(cause, ValidationError):
        return f"bad value for '{cause.full_key}': {_first_line(cause)}"
    if isinstance(cause, OmegaConfBaseException):
        return f"{_first_line(error)}: {_first_line(cause)}"
    if "Ambiguous value for argument" in str(error):
        return f"{_first_line(error)}: to sweep over the values add --multirun (-m); for a list write key=[a,b]"
    return " ".join(str(error).split())


def _suggest(error: OmegaConfBaseException) -> str:
    """Name the close match among the node's valid keys, or list them."""
    schema = getattr(error, "object_type", None)
    if not dataclasses.is_dataclass(schema):
        return f"check its spelling ({LIST_KEYS_HINT})"
    valid = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
    parent, _, wrong = str(error.full_key).rpartition(".")
    close = difflib.get_close_matches(wrong, valid, n=1)
    if close:  # the whole key, as the user writes it on the command line
        return f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
    return f"valid keys here are {', '.join(valid)}"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0].rstrip(".")
