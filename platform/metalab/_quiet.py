"""Quiet import of learn2learn's dependencies, without hiding real warnings."""

import logging
import logging.handlers
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata


def silence_gym_banner() -> None:
    """Drop gym's "Gym has been unmaintained" banner, and nothing else.

    ``import learn2learn`` imports gym 0.26, whose ``__init__`` prints the notice that
    ``gym_notices.notices`` holds for its version straight to stderr (not as a warning, so warning
    filters cannot catch it). Removing exactly that entry keeps every other message intact. metalab
    uses no gym environment, so the notice does not apply to our users.
    """
    try:
        from gym_notices import notices
        gym_version = metadata.version("gym")
    except (ImportError, metadata.PackageNotFoundError):
        return
    notices.notices.pop(gym_version, None)


# Lines Lightning logs at INFO that metalab says in its own words, or that say nothing to a metalab user.
_LIGHTNING_CHATTER = (
    "💡 Tip:",  # Lightning 2.6 advertises its cloud products ("💡 Tip: ... litlogger") on every Trainer
    "GPU available:", "TPU available:",  # train.py's header names the device the run uses
    "LOCAL_RANK: ",  # "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]", likewise (the header names the GPU)
    "`Trainer.fit` stopped: `max_steps=",  # the progress bar shows k/k meta-iterations
    "`Trainer(val_check_interval=1)` was configured",  # short runs' scaled default (metalab.validation): intended
    "Received SIGTERM:",  # "[rank: 0] Received SIGTERM: 15": train.py's "metalab: stopped: SIGTERM at step …" says it
)


class _DropLightningChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"^\[rank: \d+\] ", "", str(record.msg))  # rank_prefixed_message's "[rank: 0] "
        return not message.startswith(_LIGHTNING_CHATTER)


def quiet_lightning() -> None:
    """Drop Lightning's product tips and device banner, MLflow's store-creation notices, and known-harmless
    warnings.

    Lightning 2.6.6 still builds ``torch.utils._pytree.LeafSpec``, which torch 2.14 marks deprecated;
    the warning is about Lightning's internals, not the user's code. "GPU available but not used" is said by
    train.py's header instead (with the override that uses it); Lightning's `srun` hint is dropped (below). Every
    other message stays.
    """
    from lightning_fabric.utilities.warnings import PossibleUserWarning  # here: `import metalab` stays light

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "pytorch_lightning.trainer.connectors.signal_connector"):
        logging.getLogger(name).addFilter(_DropLightningChatter())
    # MLflow announces creating/upgrading a fresh SQLite store at INFO; its warnings and errors still show.
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message="GPU available but not used", category=PossibleUserWarning)
    # On a SLURM login node (srun on PATH) Lightning hints at `srun python ...` for every local run; metalab runs on
    # SLURM through hardware=slurm (submitit), so the hint is wrong advice there and noise elsewhere.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used",
                            category=PossibleUserWarning)


def plain_lightning_logs() -> None:
    """Lightning's log lines as plain lines on stderr, as when Lightning is imported before Hydra sets up logging.

    ``pytorch_lightning`` and ``lightning_fabric``, imported while the root logger has no handler, give their
    loggers a bare ``StreamHandler`` of their own and stop propagation; imported later they log through the root
    logger: Hydra's ``[time][logger][INFO] -`` lines, also written to the job's log file. ``metalab-train``
    imports Lightning only once Hydra runs the job (metalab.train), so this sets up what the import did before.
    """
    for name in ("pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False


@contextmanager
def held_back_trainer_banner() -> Iterator[None]:
    """Hold the lines a ``Trainer`` prints when it is built (e.g. "`Trainer(limit_val_batches=1)` was configured
    so ...") until the block ends.

    train.py checks the run against the Trainer (e.g. processes vs meta-batch) right after building it: a
    run that fails a check prints its one error line alone; one that passes prints the lines as usual.
    """
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    held = logging.handlers.BufferingHandler(capacity=10_000)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(held)
    try:
        yield
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate
    for record in held.buffer:  # reached only when the block succeeded
        logger.handle(record)


PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextmanager
def quiet_mlflow_models() -> Iterator[None]:
    """MLflow's lines while it saves, checks or loads a model (:mod:`metalab.serving`), which a correct run or
    ``metalab adapt`` does not print: its warning that a pickled network runs code when loaded (chosen: see
    ``serving.package.save_model``), its INFO lines and its download progress bars (saving checks the input example
    by loading the model). Its errors still show."""
    loggers = {name: logging.getLogger(name) for name in ("mlflow.pytorch", "mlflow.pyfunc", "mlflow.models")}
    levels = {name: logger.level for name, logger in loggers.items()}
    bar = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"
    for name, logger in loggers.items():
        logger.setLevel(logging.ERROR if name == "mlflow.pytorch" else logging.WARNING)
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])
        if bar is None:
            del os.environ[PROGRESS_BAR]
        else:
            os.environ[PROGRESS_BAR] = bar
