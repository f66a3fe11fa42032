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

from metalab.config import config_dir, experiments_dir

LIST_KEYS_HINT = "`metalab-train --cfg job` prints every key"


def check_overrides(args: list[str]) -> str | None:
    """The one-line problem with these overrides, or ``None`` when they compose.

    Flags (``--multirun``, ``--cfg``, ``--help`` ...) are Hydra's to handle: such command lines pass.
    """
    flags, overrides = split_flags(args)
    try:
        schema = schema_choice(overrides)
    except OverrideParseException as error:
        return describe(error)
    if schema:
        return schema
    shows = {"--cfg", "-c", "--info", "-i"} & set(flags)
    if shows and {"-m", "--multirun"} & set(flags):  # Hydra would raise a ValueError with a traceback
        return (f"{sorted(shows)[0]} shows one job and cannot be combined with -m: drop -m and give each key one "
                "value to see that job's config")
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


# Hydra's flags that take a value (``--cfg job``, ``-cn config``); ``--info`` takes one optionally.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                    "-cd", "--experimental-rerun"}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the overrides of a command line."""
    flags: list[str] = []
    overrides: list[str] = []
    position = 0
    while position < len(args):
        word = args[position]
        following = args[position + 1] if position + 1 < len(args) else None
        takes_value = word in FLAGS_WITH_VALUE or (word in ("--info", "-i") and following in INFO_TOPICS)
        if not word.startswith("-"):
            overrides.append(word)
        else:
            flags += [word, following] if takes_value and following is not None else [word]
            position += 1 if takes_value else 0
        position += 1
    return flags, overrides


def schema_choice(overrides: list[str]) -> str | None:
    """Refuse a group's generated schema (``algorithm=maml_schema``) as an option: it is the type of an option,
    not one (it would run with the schema's defaults under a misleading name)."""
    for override in OverridesParser.create().parse_overrides(overrides):
        if "." in override.key_or_group or override.value_type is None:
            continue  # a key, not a group; or a deletion (~group)
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if isinstance(value, str) and value.endswith("_schema"):
                group = override.key_or_group
                options = ", ".join(group_options(group)) or "the files in conf/" + group
                return (f"{group}={value} is the schema of an option, not an option: choose one of {options} "
                        f"({group}=<option>)")
    return None


def group_options(group: str) -> list[str]:
    """The options of a config group a user may choose (``conf/<group>/*.yaml``, ``experiments/`` presets)."""
    folder = experiments_dir() if group == "experiment" else config_dir() / group
    return sorted(path.stem for path in folder.glob("*.yaml"))


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
