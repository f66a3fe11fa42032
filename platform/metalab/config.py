"""Config schemas, registered in Hydra's ConfigStore so a bad key or type fails before training starts.

Top-level nodes (``trainer``, ``hardware``, ``optimizer``) have hand-written dataclasses. Every option of
the object groups (``algorithm/``, ``task/``, ``model/``, ``tracking/``) gets a schema generated from the
constructor of its ``_target_``: each setting is then defined once, as a typed constructor argument,
and its YAML starts with ``defaults: [<option>_schema, _self_]``. A new option needs no edit here.
Generating a schema imports its target (torch, Lightning, ...); :func:`schema` keeps them on disk
(:mod:`metalab.schema_cache`), so composing a config (``--help``, ``--cfg job``) imports no target.
"""

from __future__ import annotations

import enum
import inspect
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, make_dataclass
from pathlib import Path, PurePath
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING as OMEGACONF_MISSING
from omegaconf import OmegaConf

from metalab.schema_cache import SchemaCache

OBJECT_GROUPS = ("algorithm", "task", "model", "tracking")
# The settings a resume may change (metalab.resume): a longer budget, and the learning rates that recover a run
# from divergence. fnmatch patterns over dotted keys; a pattern naming a group (``trainer``) allows its keys.
DEFAULT_RESUME_ALLOW = ("trainer.max_steps", "trainer.max_time", "optimizer.lr", "algorithm.inner_lr")


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
    max_time: str | None = None  # a wall-clock budget "DD:HH:MM:SS"; training stops at it or max_steps, then tests
    val_check_interval: int | None = None  # None: max_steps/5, at most 1000 (metalab.validation); and at the end
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
class SGDConfig(OptimizerConfig):
    """``optimizer=sgd``: plain SGD (Reptile's outer step), or with heavy-ball momentum (RFS's pre-training)."""

    _target_: str = "torch.optim.SGD"
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class ReproductionConfig:
    """What a paper published for an ``experiments/`` preset, and how a run of the preset is judged.

    ``metric`` of the run, times ``scale``, is in the published unit (accuracy 0.987 × 100 = 98.7 %; a return:
    ``scale: 1``). The run is *within tolerance* when it differs from ``published`` by at most ``tolerance``, else
    *below* or *above* (for a loss, *below* is better). ``published: null`` marks a row without a published number
    (our own reference data).
    """

    source: str = OMEGACONF_MISSING  # authors, venue, table: where the number is printed
    published: float | None = None
    published_ci95: float | None = None  # the ± printed beside it, when it is a 95% interval over test tasks
    published_std_over_runs: float | None = None  # the ± printed beside it, when it is a std over runs (seeds)
    tolerance: float = 1.0
    metric: str = "meta_test/post_acc"
    scale: float = 100.0
    higher_is_better: bool = True
    note: str = ""  # how this protocol differs from the paper's, if at all
    smoke: list[str] = field(default_factory=list)  # overrides added by `metalab reproduce --budget smoke`
    # Multi-source presets (Meta-Dataset): per source [published, ± 95% CI], each judged on its own row against
    # the run's <metric's stage>/<source>/<name> (meta_test/omniglot/post_acc); a source without it is "no data".
    sources: dict[str, list[float]] = field(default_factory=dict)
    # Further numbers of the same run, each judged on a row of its own, NAME/<the metric's last part>:
    # {metric: [published, tolerance]}, e.g. a figure's value before adaptation {meta_test/pre_return: [-130, 20]};
    # published null: no number (yet) to judge it by.
    also: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass
class MetalabConfig:
    algorithm: Any = MISSING
    task: Any = MISSING
    model: Any = MISSING
    tracking: Any = MISSING
    learner: Any = field(default_factory=lambda: schema(  # the LightningModule and its own settings
        "metalab.learner.MetaLearner", injected=("optimizer", "problem", "runner", "scheduler"))())
    runner: Any = field(default_factory=lambda: schema("metalab.runner.TaskRunner")())  # how tasks execute
    scheduler: Any = None  # scheduler=cosine|step: the outer learning rate's schedule, stepped per meta-iteration
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    optimizer: Any = None  # optimizer=adam|sgd, each typed by its schema (OptimizerConfig, SGDConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)  # Lightning callbacks by name, each with a _target_
    output_dir: str = "${hydra:runtime.output_dir}"  # the job's folder (a resumed run: the folder it began in)
    seed: int = 0
    # What a sweeper optimises (the last validation's value); reinforcement-learning tasks choose
    # meta_val/post_return (conf/task/objective/post_return.yaml), and a search's direction follows it.
    objective: str = "meta_val/post_loss"
    resume: str | None = None  # an MLflow run id: continue it from its last checkpoint; "auto": the run this
    # job's output folder began, if any (a requeued SLURM job restarts there)
    resume_allow: list[str] = field(default_factory=lambda: list(DEFAULT_RESUME_ALLOW))  # what a resume may change
    sampling_workers: int = 0  # processes drawing training meta-batches ahead of the step (0: the training one)
    reproduction: ReproductionConfig | None = None  # set by experiments/ presets: the published number


# The schema generator is our own, not hydra-zen's `builds(populate_full_signature=True)` (0.17.2 tried):
# hydra-zen turns every annotation OmegaConf cannot check (`dict[str, int] | None`, `int | float`, a
# Literal, a class) into `Any`, so a mistyped value reaches the constructor unchecked and an unsupported
# type passes unnoticed; it does not follow `**kwargs` to the base class; and it writes a `Path` default
# as a pickled Python object in `--cfg job`. Doing what we need here takes less code than adapting it.
PRIMITIVES = (int, float, str, bool)
# Argument types that are live objects handed in by the job (metalab.job) at `instantiate` (an algorithm's
# `model`, built from `model/`): no config value, so no schema field. Every other type the generator cannot
# express is an error at registration, never a silent skip. Import paths, so importing this module does not
# import torch.
INJECTED = ("torch.nn.Module",)
EXPRESSIBLE = ("int, float, str, bool, Path, an Enum, a Literal of one type, list[X], tuple[X, ...], dict[str, X] "
               "or X | None of these (int | float is read as float)")


def _config_type(annotation: Any) -> Any:
    """The OmegaConf type that checks values of a constructor annotation; ``TypeError`` (saying why) if none."""
    if annotation in PRIMITIVES or annotation is Any:
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return str  # YAML holds a string; the constructor converts it (`Path(root)`)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation  # OmegaConf checks the member name
    if annotation in (list, tuple, Sequence):
        return list[Any]
    if annotation in (dict, Mapping):
        return dict[str, Any]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        kinds = {type(arg) for arg in args}  # {bool} for Literal[True, False]: bool is not int here
        if len(kinds) == 1 and kinds <= set(PRIMITIVES):
            return kinds.pop()  # the constructor checks the value and names the choices
        raise TypeError("its values are not all int, all str, all float or all bool")
    if origin in (typing.Union, types.UnionType):
        kinds = {_config_type(arg) for arg in args if arg is not type(None)}
        if kinds == {int, float}:
            kinds = {float}  # OmegaConf has no int-or-float: 2 arrives as 2.0, which such a constructor takes
        if len(kinds) != 1:
            raise TypeError("OmegaConf's only unions are Optional[X] (and int | float is read as float)")
        (kind,) = kinds
        return kind | None if type(None) in args else kind
    if origin in (list, Sequence) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return list[_config_type(args[0])]
    if origin is tuple:  # fixed length, e.g. (int, int): a list of the one item type (its length is not checked)
        kinds = {_config_type(arg) for arg in args}
        if len(kinds) != 1:
            raise TypeError("a tuple of different item types has no OmegaConf type")
        return list[kinds.pop()]
    if origin in (dict, Mapping):
        if args[0] is not str:
            raise TypeError("config keys are strings: use dict[str, ...]")
        return dict[str, _config_type(args[1])]
    raise TypeError(f"OmegaConf has no type for {inspect.formatannotation(annotation)}")


def _is_injected(annotation: Any) -> bool:
    return isinstance(annotation, type) and any(issubclass(annotation, get_object(path)) for path in INJECTED)


def _constructor_arguments(cls: type) -> list[tuple[type, inspect.Parameter]]:
    """Each named argument of ``cls``'s constructor with the class that declares it. While a constructor takes
    ``**kwargs``, the arguments of the next constructor up the MRO that it does not name itself follow (with
    that constructor's defaults): what ``cls(...)`` accepts when it passes ``**kwargs`` on to ``super().__init__``.
    ``*args`` gets no field: Hydra passes config values by name."""
    arguments: dict[str, tuple[type, inspect.Parameter]] = {}
    for owner in cls.__mro__:
        if "__init__" not in vars(owner):
            continue
        if owner is object:
            break
        parameters = list(inspect.signature(vars(owner)["__init__"]).parameters.values())[1:]  # without self
        for parameter in parameters:
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                arguments.setdefault(parameter.name, (owner, parameter))
        if all(parameter.kind is not parameter.VAR_KEYWORD for parameter in parameters):
            break
    return list(arguments.values())


def _field(default: Any) -> Any:
    if default is inspect.Parameter.empty:  # a required argument: OmegaConf's "???" (must be set)
        return field(default=OMEGACONF_MISSING)
    if isinstance(default, PurePath):
        return field(default=str(default))
    if isinstance(default, list | tuple):
        return field(default_factory=lambda value=list(default): list(value))
    if isinstance(default, dict):
        return field(default_factory=lambda value=dict(default): dict(value))
    return field(default=default)


def schema_for(target: str, injected: tuple[str, ...] = ()) -> type:
    """A dataclass mirroring the typed constructor arguments of ``target`` (an import path), following
    ``**kwargs`` to the base classes' constructors. Raises ``TypeError`` naming the class, the argument and
    the annotation for an argument whose type no config value can have (see ``EXPRESSIBLE``, ``INJECTED``).
    ``injected``: names of further arguments the job passes in (the learner's optimiser, runner, ...)."""
    return generate_schema(target, injected)[0]


def generate_schema(target: str, injected: tuple[str, ...] = ()) -> tuple[type, set[str]]:
    """:func:`schema_for`'s schema, and the modules of the classes it was read from (the target, the base
    classes reached through ``**kwargs``, the classes of annotations and defaults): what the disk cache's entry
    depends on (:mod:`metalab.schema_cache`)."""
    cls = get_object(target)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=target))]
    if not getattr(cls, "instantiate_recursive", True):  # it builds its nested configs itself (task=multi_source)
        fields.append(("_recursive_", bool, field(default=False)))
    modules = {cls.__module__}
    hints: dict[type, dict[str, Any]] = {}
    for owner, parameter in _constructor_arguments(cls):
        modules.add(owner.__module__)
        if owner not in hints:
            try:
                hints[owner] = typing.get_type_hints(vars(owner)["__init__"])
            except NameError as error:  # a name imported under TYPE_CHECKING only, or a typo
                raise TypeError(f"{target}: cannot resolve the annotations of {owner.__qualname__}.__init__ "
                                f"({error}): import the names they use at module level") from None
        name = parameter.name
        if name in injected:
            continue
        written = parameter.annotation if isinstance(parameter.annotation, str) else (
            inspect.formatannotation(parameter.annotation))
        where = f"{target}({name}: {written})"
        if owner is not cls:
            where += f" [from {owner.__module__}.{owner.__qualname__} through **kwargs]"
        if name not in hints[owner]:
            raise TypeError(f"{target}({name}) [declared in {owner.__qualname__}] has no annotation: schema "
                            f"generation needs its type to check config values; annotate it with {EXPRESSIBLE}")
        annotation = hints[owner][name]
        modules |= {kind.__module__ for kind in _classes_in(annotation)} | {type(parameter.default).__module__}
        if _is_injected(annotation):
            continue
        try:
            kind = _config_type(annotation)
        except TypeError as reason:
            raise TypeError(f"{where}: schema generation cannot express {written} ({reason}); annotate it with "
                            f"{EXPRESSIBLE}, or add its type to metalab.config.INJECTED if the job passes the "
                            "object in") from None
        fields.append((name, kind, _field(parameter.default)))
    return make_dataclass(f"{cls.__name__}Config", fields), modules


def _classes_in(annotation: Any) -> list[type]:
    """The classes an annotation names, at any depth (``dict[str, Color] | None``: dict, str, Color, NoneType)."""
    found = [annotation] if isinstance(annotation, type) else []
    for argument in typing.get_args(annotation):
        found += _classes_in(argument)
    return found


_SCHEMAS: SchemaCache | None = None


def schema(target: str, injected: tuple[str, ...] = ()) -> type:
    """:func:`schema_for`, kept on disk between processes (:mod:`metalab.schema_cache`): rebuilt without
    importing ``target`` while what it was read from is unchanged. :func:`register_configs` saves new ones."""
    global _SCHEMAS
    if _SCHEMAS is None:
        _SCHEMAS = SchemaCache(generate_schema)
    return _SCHEMAS.get(target, injected)


def register_configs(root: Path | None = None) -> None:
    """Store the top-level schema, one generated schema per option of the object groups, and the paper
    reproductions of ``experiments/`` as options of the ``experiment`` group."""
    root = root or config_dir()
    OmegaConf.register_new_resolver("metalab_config_groups", config_groups_help, replace=True)
    OmegaConf.register_new_resolver("metalab_direction", sweep_direction, replace=True)
    store = ConfigStore.instance()
    # Hydra deep-copies its config repository, and with it this store (every schema and preset, ~0.07 s), each
    # time it lists a group's options: 160 copies for `--help`. The store is a process-wide singleton whose
    # `load` copies the node it returns, so the copies can share it, as Hydra's main branch does
    # (facebookresearch/hydra#2928: the repository no longer holds the store).
    store.__deepcopy__ = lambda memo: store
    store.store(name="metalab_schema", node=MetalabConfig)
    store.store(group="optimizer", name="adam_schema", node=OptimizerConfig)  # hand-written: torch's signatures
    store.store(group="optimizer", name="sgd_schema", node=SGDConfig)         # carry every option, used or not
    for preset in sorted(experiments_dir().glob("*.yaml")):
        store.store(group="experiment", name=preset.stem, node=OmegaConf.load(preset), package="_global_")
    for group in OBJECT_GROUPS:
        for option in sorted((root / group).glob("*.yaml")):
            target = (yaml.safe_load(option.read_text()) or {}).get("_target_")
            if target:
                store.store(group=group, name=f"{option.stem}_schema", node=schema(target))
    if _SCHEMAS is not None:
        _SCHEMAS.save()


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better: accuracies and returns (``meta_val/post_acc``,
    ``meta_test/post_return_step2``), not losses."""
    return re.search(r"_(acc|return)(_step\d+)?$", metric) is not None


def sweep_direction(objective: str) -> str:
    """What a search does with ``objective`` (``hydra.sweeper.direction: ${metalab_direction:${objective}}``):
    ``maximize`` an accuracy or a return, ``minimize`` anything else (a loss)."""
    return "maximize" if higher_is_better(objective) else "minimize"


def config_groups_help() -> str:
    """``metalab-train --help``'s list of groups and their options, without the generated ``*_schema`` entries.

    Hydra's own ``$APP_CONFIG_GROUPS`` lists every config a group holds, schemas included; the help template
    (``hydra.help`` in ``conf/config.yaml``) calls this resolver instead, over the same config loader.
    """
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()

    def groups(parent: str) -> list[str]:
        found = []
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if group == "hydra" or group.startswith("hydra/"):
                continue
            found += [group] if loader.get_group_options(group) else []
            found += groups(group)
        return found

    lines = []
    for group in sorted(groups("")):
        options = [option for option in sorted(loader.get_group_options(group)) if not option.endswith("_schema")]
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)
