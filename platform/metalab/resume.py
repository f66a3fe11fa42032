"""``resume=<run id>`` and ``resume=auto`` continue a run with the settings it was recorded with.

The config a resumed run uses is the run's recorded one (artifact ``config/config.yaml``, the resolved config;
after a resume that changed settings, ``config/resumed_config.yaml``), not what the command line composes
today: a setting the command line leaves alone keeps its recorded value. A setting the command line gives
(a ``key=value``, or a value a group or preset sets differently from the defaults) that differs from the
recorded one is refused, in one line listing every difference, unless its key matches ``resume_allow``
(:class:`~metalab.config.MetalabConfig`; default :data:`DEFAULT_RESUME_ALLOW`). Keys that change no number
(:data:`~metalab.tracking.config_hash.NOT_SCIENCE`: tracking, output folder, workers, display) follow the
command line.

An allowed change takes effect and is recorded: a constructor argument through the objects built from the
config; an optimiser or scheduler setting by rewriting the checkpoint's optimiser and scheduler state as it
loads (:class:`ApplyResumeChanges`; the checkpoint would otherwise restore the recorded value); a change the
checkpoint would undo anyway (an algorithm setting that only initialises learned state, e.g. Meta-SGD's
``inner_lr``) is refused. The run gets tag ``metalab.resume_changes`` (``optimizer.lr: 0.001 → 0.0001 at step
500``; later resumes append), a new ``metalab.config_hash`` (it no longer ran one config) and the config in
effect as ``config/resumed_config.yaml``.

Everything here reads only: a resume refused (settings, an unreadable checkpoint) leaves the run untouched.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback

from metalab.checkpoints import check_resumable
from metalab.config import DEFAULT_RESUME_ALLOW, config_dir
from metalab.errors import ConfigError
from metalab.tracking.base import Tracking
from metalab.tracking.config_hash import CONFIG_HASH_TAG, NOT_SCIENCE
from metalab.tracking.recorded import read_artifact_text, run_client

RESUME_CHANGES_TAG = "metalab.resume_changes"
RECORDED_CONFIG = "config/config.yaml"  # written by MLflowTracking._log_config when the run starts
RESUMED_CONFIG = "config/resumed_config.yaml"  # the config in effect after the latest resume that changed one


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT: Any = _Absent()  # a key one of the two configs does not have


@dataclass
class Change:
    """A setting whose given value differs from the run's recorded one."""

    path: tuple[str, ...]
    recorded: Any
    given: Any

    @property
    def key(self) -> str:
        return ".".join(self.path)

    def __str__(self) -> str:
        return f"{self.key}: {show(self.recorded)} → {show(self.given)}"


def show(value: Any) -> str:
    """A value as a user writes it: ``0.001``, ``null``, ``[40, 40]``, ``{a: 1}``, ``(absent)``."""
    if value is ABSENT or isinstance(value, str):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


@dataclass
class ResumePlan:
    """How a resume goes on: the run's folder and checkpoint, the config in effect and what it changed."""

    run_id: str
    output_dir: Path
    checkpoint: Path
    step: int  # the checkpoint's global step: where the changes take effect
    config: DictConfig
    changes: list[Change] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags before the resume

    @property
    def choices(self) -> dict[str, str]:
        """The run's config groups and options (its tags ``metalab.<group>``), e.g. ``{"algorithm": "maml"}``."""
        return {key.removeprefix("metalab."): value for key, value in self.tags.items()
                if key.removeprefix("metalab.") in ("algorithm", "task", "model")}

    def describe(self) -> str:
        """``optimizer.lr: 0.001 → 0.0001, trainer.max_steps: 20 → 40 at step 20``."""
        return f"{', '.join(map(str, self.changes))} at step {self.step}"

    def callback(self) -> ApplyResumeChanges | None:
        """The callback that puts the optimiser and scheduler changes into the checkpoint as it loads."""
        optimizer = {c.path[1]: (c.recorded, c.given) for c in self.changes if c.path[0] == "optimizer"}
        scheduler = {c.path[1]: c.given for c in self.changes if c.path[0] == "scheduler"}
        return ApplyResumeChanges(optimizer, scheduler) if optimizer or scheduler else None

    def record(self, tracking: Tracking) -> None:
        """Tag the resumed run with its changes and store the config now in effect (nothing if none changed)."""
        if not self.changes:
            return
        earlier = self.tags.get(RESUME_CHANGES_TAG)
        changes = f"{earlier}; {self.describe()}" if earlier else self.describe()
        # The run no longer computed one config: its hash must not match a fresh run's of either config.
        digest = hashlib.sha256(f"{self.tags.get(CONFIG_HASH_TAG, '')}\n{self.describe()}".encode()).hexdigest()
        tracking.set_tags({RESUME_CHANGES_TAG: changes, CONFIG_HASH_TAG: digest})
        run_client(tracking).log_text(self.run_id, OmegaConf.to_yaml(self.config), RESUMED_CONFIG)


def plan_resume(cfg: DictConfig, tracking: Tracking, run_id: str) -> ResumePlan:
    """Check that run ``run_id`` can go on with this command line's settings and return how; reads only.

    Raises ``ConfigError`` (one line) for an unreadable checkpoint (naming an older readable one), for settings
    that differ from the recorded ones outside ``cfg.resume_allow``, and for allowed changes that cannot take
    effect.
    """
    what = f"resume={cfg.resume}" + (f" (run {run_id})" if cfg.resume != run_id else "")
    output_dir, checkpoint_path = tracking.locate(run_id)
    checkpoint = check_resumable(checkpoint_path, what)
    client = run_client(tracking)
    recorded = recorded_config(client, run_id, what)
    given = resolved(cfg, output_dir)
    baseline = resolved(default_config(), output_dir)
    explicit = explicit_keys(list(HydraConfig.get().overrides.task))
    config, changes = merge(recorded, given, baseline, explicit)
    allow = [str(pattern) for pattern in cfg.get("resume_allow", DEFAULT_RESUME_ALLOW)]
    refused = [change for change in changes if not allowed(change.key, allow)]
    if refused:
        keys = ",".join(dict.fromkeys([*allow, *(change.key for change in refused)]))
        raise ConfigError(f"{what}: the command line changes settings the run was recorded with: "
                          f"{', '.join(map(str, refused))}. A resumed run keeps its recorded settings except keys "
                          f"in resume_allow: drop these overrides, or allow them with 'resume_allow=[{keys}]'")
    for change in changes:
        problem = unapplicable(change, checkpoint, recorded)
        if problem:
            raise ConfigError(f"{what}: {change.key} cannot change on resume: {problem}; drop the override or "
                              "start a new run")
    return ResumePlan(run_id, output_dir, checkpoint_path, int(checkpoint.get("global_step", 0)),
                      OmegaConf.create(config), changes, dict(client.get_run(run_id).data.tags))


def recorded_config(client: Any, run_id: str, what: str) -> dict[str, Any]:
    """The config run ``run_id`` is running with: the latest resume's, else the one it started with."""
    for path in (RESUMED_CONFIG, RECORDED_CONFIG):
        text = read_artifact_text(client, run_id, path)
        if text is not None:
            return OmegaConf.to_container(OmegaConf.create(text))
    raise ConfigError(f"{what}: the run has no recorded config (artifact {RECORDED_CONFIG}), so a resume cannot "
                      "keep its settings: start a new run")


def resolved(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """``cfg`` as plain resolved values (as the run recorded its own), in the run's output folder."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def default_config() -> DictConfig:
    """What ``metalab-train`` composes with no overrides: a setting equal to it was not given."""
    if GlobalHydra.instance().is_initialized():  # inside the job's @hydra.main
        return compose("config")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config")


def explicit_keys(overrides: list[str]) -> list[tuple[str, ...]]:
    """The keys ``key=value`` overrides name (a group choice, ``algorithm=maml``, names none: its values count
    where they differ from the defaults)."""
    groups = {path.name for path in config_dir().iterdir() if path.is_dir()} | {"experiment"}
    keys = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        head = key.split(".")[0]
        if "/" not in key and head != "hydra" and ("." in key or head not in groups):
            keys.append(tuple(key.split(".")))
    return keys


def merge(recorded: dict[str, Any], given: dict[str, Any], baseline: dict[str, Any],
          explicit: list[tuple[str, ...]]) -> tuple[dict[str, Any], list[Change]]:
    """The recorded config, with the given values of the :data:`NOT_SCIENCE` keys and of the keys the command line
    gives; and those given keys whose values differ from the recorded ones. Where a group differs as a whole (a
    subtree against ``null``), the group is one change."""
    changes: list[Change] = []

    def given_here(path: tuple[str, ...]) -> bool:
        return at(given, path) != at(baseline, path) or any(
            key[:len(path)] == path or path[:len(key)] == key for key in explicit)

    def walk(old: Any, new: Any, path: tuple[str, ...]) -> Any:
        if any(".".join(path) == key or ".".join(path).startswith(key + ".") for key in NOT_SCIENCE):
            return new
        if isinstance(old, dict) and isinstance(new, dict) and old.get("_target_") != new.get("_target_") \
                and not given_here(path):  # the run's own option of a group (task=kanji) against this command
            return old                     # line's default one (sinusoid): the recorded one, whole
        if isinstance(old, dict) and isinstance(new, dict):
            merged = {}
            for key in [*old, *(key for key in new if key not in old)]:
                value = walk(old.get(key, ABSENT), new.get(key, ABSENT), (*path, key))
                if value is not ABSENT:
                    merged[key] = value
            return merged
        if old == new:
            return old
        if not given_here(path):
            return new if old is ABSENT else old  # a key newer than the run: its default
        changes.append(Change(path, old, new))
        return new

    return walk(recorded, given, ()), changes


def at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return ABSENT
        tree = tree[key]
    return tree


def allowed(key: str, patterns: list[str]) -> bool:
    """Whether ``key`` (``optimizer.lr``) matches a pattern of ``resume_allow`` (``optimizer.lr``, ``trainer.*``,
    or a parent: ``trainer``)."""
    parts = key.split(".")
    candidates = [".".join(parts[:end]) for end in range(len(parts), 0, -1)]
    return any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates for pattern in patterns)


def unapplicable(change: Change, checkpoint: dict[str, Any], recorded: dict[str, Any]) -> str | None:
    """Why an allowed change would not take effect on resume, or ``None``."""
    head, name = change.path[0], ".".join(change.path[1:])
    if head in ("optimizer", "scheduler") and not name:
        return f"the checkpoint holds the state of the recorded {head}, {show(change.recorded)}"
    if head == "optimizer":
        groups = [group for state in checkpoint.get("optimizer_states", []) for group in state["param_groups"]]
        if not groups or any(name not in group for group in groups):
            return f"the checkpoint's optimizer state has no setting '{name}' to change"
    elif head == "scheduler":
        schedulers = checkpoint.get("lr_schedulers", [])
        if not schedulers or any(name not in state for state in schedulers):
            return f"the checkpoint's scheduler state has no setting '{name}' to change"
    elif head in ("algorithm", "model") and len(change.path) > 1 and initialises_state(recorded, change):
        return (f"it sets the initial value of {head} state that the checkpoint restores, so the recorded "
                f"{show(change.recorded)} would stay in effect")
    return None


def initialises_state(recorded: dict[str, Any], change: Change) -> bool:
    """Whether the algorithm built with the changed value has other state (parameters, buffers) than the one
    built with the recorded value: then the checkpoint, which restores that state, undoes the change."""
    states = []
    for value in (change.recorded, change.given):
        config = copy.deepcopy(recorded)
        node = config
        for key in change.path[:-1]:
            node = node[key]
        node[change.path[-1]] = value
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            algorithm = instantiate(config["algorithm"], model=instantiate(config["model"]))
        states.append(algorithm.state_dict())
    before, after = states
    return before.keys() != after.keys() or any(
        before[key].shape != after[key].shape or not torch.equal(before[key], after[key]) for key in before)


class ApplyResumeChanges(Callback):
    """Puts allowed optimiser and scheduler changes into the checkpoint as it loads, before Lightning restores
    the optimiser and scheduler from it (which would bring back the recorded values).

    ``optimizer``: param-group setting → (recorded, given); ``scheduler``: scheduler setting → given. With a
    scheduler, a new ``lr`` rescales the schedule (the current rate, the base rates) by given/recorded: the
    schedule goes on where it was, from the new starting rate.
    """

    def __init__(self, optimizer: dict[str, tuple[Any, Any]], scheduler: dict[str, Any]) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        schedulers = checkpoint.get("lr_schedulers") or []
        for state in checkpoint.get("optimizer_states", []):
            for group in state["param_groups"]:
                for name, (recorded, given) in self.optimizer.items():
                    if name == "lr" and schedulers and recorded:
                        for key in ("lr", "initial_lr"):
                            if key in group:
                                group[key] *= given / recorded
                    else:
                        group[name] = tuple(given) if isinstance(group[name], tuple) else given
        for state in schedulers:
            if "lr" in self.optimizer and self.optimizer["lr"][0]:
                recorded, given = self.optimizer["lr"]
                for key in ("base_lrs", "_last_lr"):
                    if key in state:
                        state[key] = [rate * given / recorded for rate in state[key]]
            state.update(self.scheduler)
