"""Config schemas, registered in Hydra's ConfigStore so a bad key or type fails before training starts.

Top-level nodes (``trainer``, ``hardware``, ``optimizer``) have hand-written dataclasses. Every option of
the object groups (``algorithm/``, ``task/``, ``model/``, ``tracking/``) gets a schema generated from the
constructor of its ``_target_``: each setting is then defined once, as a typed constructor argument,
and its YAML starts with ``defaults: [<option>_schema, _self_]``. A new option needs no edit here.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING as OMEGACONF_MISSING
from omegaconf import OmegaConf

PRIMITIVES = (int, float, str, bool)
OBJECT_GROUPS = ("algorithm", "task", "model", "tracking")


def experiments_dir() -> Path:
    """Paper reproductions, each an ``experiment=`` preset: ``$METALAB_EXPERIMENTS_DIR`` if set, else the
    ``experiments/`` folder beside the config tree."""
    if "METALAB_EXPERIMENTS_DIR" in os.environ:
        return Path(os.environ["METALAB_EXPERIMENTS_DIR"]).resolve()
    return config_dir().parent / "experiments"


def config_dir() -> Path:
    """The Hydra config tree: ``$METALAB_CONFIG_DIR`` if set, else the checkout's ``conf/``.

    metalab is installed editable from its checkout (``make setup``); a copy installed elsewhere points
    ``METALAB_CONFIG_DIR`` at a config tree.
    """
    if "METALAB_CONFIG_DIR" in os.environ:
        return Path(os.environ["METALAB_CONFIG_DIR"]).resolve()
    return Path(__file__).resolve().parents[2] / "conf"


@dataclass
class TrainerConfig:
    """Types of the ``pytorch_lightning.Trainer`` arguments a run sets (``trainer/``: their values; steps
    are outer-loop updates, meta-iterations). ``hardware/`` adds the accelerator's arguments."""

    _target_: str = "pytorch_lightning.Trainer"
    max_steps: int = OMEGACONF_MISSING
    val_check_interval: int = OMEGACONF_MISSING
    log_every_n_steps: int = OMEGACONF_MISSING
    num_sanity_val_steps: int = OMEGACONF_MISSING
    enable_progress_bar: bool = OMEGACONF_MISSING
    enable_model_summary: bool = OMEGACONF_MISSING
    enable_checkpointing: bool = OMEGACONF_MISSING
    deterministic: bool = OMEGACONF_MISSING
    gradient_clip_val: float | None = None


@dataclass
class HardwareConfig:
    """Where the run executes: the ``Trainer``'s accelerator, devices and precision."""

    accelerator: str = "cpu"
    devices: Any = 1  # a count, a list of indices or "auto", as Lightning takes it
    precision: str = "32-true"
    strategy: str = "auto"  # "ddp": one process per device, the meta-batch's tasks split across them
    num_nodes: int = 1


@dataclass
class OptimizerConfig:
    """The outer-loop (meta) optimiser, built as a partial; the MetaLearner passes the meta-parameters."""

    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class ReproductionConfig:
    """What a paper published for an ``experiments/`` preset, and how a run of the preset is judged.

    ``metric`` of the run, times ``scale``, is in the published unit (accuracy 0.987 × 100 = 98.7 %). The
    run is *within tolerance* when it differs from ``published`` by at most ``tolerance``, else *below* or
    *above*. ``published: null`` marks a row without a published number (our own reference data).
    """

    source: str = OMEGACONF_MISSING  # authors, venue, table: where the number is printed
    published: float | None = None
    published_ci95: float | None = None  # the ± printed beside it, if any
    tolerance: float = 1.0
    metric: str = "meta_test/post_acc"
    scale: float = 100.0
    higher_is_better: bool = True
    note: str = ""  # how this protocol differs from the paper's, if at all
    smoke: list[str] = field(default_factory=list)  # overrides added by `metalab reproduce --budget smoke`


@dataclass
class MetalabConfig:
    algorithm: Any = MISSING
    task: Any = MISSING
    model: Any = MISSING
    tracking: Any = MISSING
    learner: Any = MISSING  # the LightningModule (metalab.learner.MetaLearner) and its own settings
    runner: Any = field(default_factory=lambda: schema_for("metalab.runner.TaskRunner")())  # how tasks execute
    scheduler: Any = None  # scheduler=cosine|step: the outer learning rate's schedule, stepped per meta-iteration
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)  # Lightning callbacks by name, each with a _target_
    output_dir: str = "${hydra:runtime.output_dir}"  # the job's folder (a resumed run: the folder it began in)
    seed: int = 0
    objective: str = "meta_val/post_loss"  # what a sweeper optimises (the last validation's value)
    resume: str | None = None  # an MLflow run id: continue it from its last checkpoint; "auto": the run this
    # job's output folder began, if any (a requeued SLURM job restarts there)
    sampling_workers: int = 0  # processes drawing training meta-batches ahead of the step (0: the training one)
    reproduction: ReproductionConfig | None = None  # set by experiments/ presets: the published number


def _config_type(annotation: Any) -> Any:
    """The OmegaConf type for a constructor annotation, or ``None`` if it is no config value."""
    if annotation in PRIMITIVES or annotation is Any:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal and all(isinstance(arg, str) for arg in args):
        return str  # the constructor checks the value and names the choices
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _config_type(next(arg for arg in args if arg is not type(None)))
        return None if inner is None else inner | None
    if origin in (list, tuple, Sequence) and args and args[0] in PRIMITIVES:
        return list[args[0]]
    return None  # a runtime object (e.g. the model handed to an algorithm by train.py)


def schema_for(target: str) -> type:
    """A dataclass mirroring the typed constructor arguments of ``target`` (an import path)."""
    cls = get_object(target)
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=target))]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        kind = _config_type(hints.get(name, Any))
        if name == "self" or kind is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        if default is inspect.Parameter.empty:  # a required argument: OmegaConf's "???" (must be set)
            fields.append((name, kind, field(default=OMEGACONF_MISSING)))
        elif isinstance(default, list | tuple):
            fields.append((name, kind, field(default_factory=lambda value=list(default): list(value))))
        else:
            fields.append((name, kind, field(default=default)))
    return make_dataclass(f"{cls.__name__}Config", fields)


def register_configs(root: Path | None = None) -> None:
    """Store the top-level schema, one generated schema per option of the object groups, and the paper
    reproductions of ``experiments/`` as options of the ``experiment`` group."""
    root = root or config_dir()
    store = ConfigStore.instance()
    store.store(name="metalab_schema", node=MetalabConfig)
    for preset in sorted(experiments_dir().glob("*.yaml")):
        store.store(group="experiment", name=preset.stem, node=OmegaConf.load(preset), package="_global_")
    for group in OBJECT_GROUPS:
        for option in sorted((root / group).glob("*.yaml")):
            target = (yaml.safe_load(option.read_text()) or {}).get("_target_")
            if target:
                store.store(group=group, name=f"{option.stem}_schema", node=schema_for(target))
