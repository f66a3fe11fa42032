"""Where a search keeps its Optuna study, and how a worker or a trial's job finds it.

With ``hydra.sweeper.storage`` unset, the study is an Optuna journal file in the sweep's folder
(:data:`JOURNAL`), so jobs in other processes (joblib, SLURM on a shared file system) can report to it for
pruning. ``storage=<SQLAlchemy URL>`` (PostgreSQL, e.g. a database beside the tracking server's, or SQLite)
or ``storage=<file path>`` (a journal file on a shared file system) keeps it where several workers started
apart (terminals, machines, a SLURM job array) find it by ``study_name`` and take its trials in turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from metalab.errors import ConfigError, one_line

if TYPE_CHECKING:
    import optuna

SWEEPER = "hydra_plugins.metalab_optuna_sweeper.OptunaSweeper"  # hydra/sweeper=optuna's _target_
JOURNAL = "optuna_study.journal"  # Optuna's journal (JSON lines) of the study
DEFAULT_NAME = "metalab"  # a study of its own journal file needs no chosen name


@dataclass(frozen=True)
class StudyPlace:
    """A study's storage (a SQLAlchemy URL or a journal file's path) and name."""

    storage: str
    name: str

    @property
    def shown(self) -> str:
        """The storage as it may be printed and tagged: a URL's password hidden."""
        if "://" not in self.storage:
            return self.storage
        from sqlalchemy.engine import make_url

        return make_url(self.storage).render_as_string(hide_password=True)


def study_place(sweeper: DictConfig, sweep_dir: Path) -> StudyPlace:
    """The study named by ``hydra.sweeper`` (``storage``, ``study_name``) of a sweep writing into ``sweep_dir``."""
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    if storage is None:
        return StudyPlace(str(sweep_dir.absolute() / JOURNAL), str(name or DEFAULT_NAME))
    if not name:
        raise ConfigError("hydra.sweeper.study_name: a study kept in hydra.sweeper.storage needs a name, the same "
                          "in every worker that shares it")
    return StudyPlace(str(storage), str(name))


def open_storage(place: StudyPlace) -> optuna.storages.BaseStorage:
    """Optuna's storage at ``place``: RDB for a URL, a journal file for a path."""
    import optuna
    import sqlalchemy.exc

    if "://" not in place.storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(place.storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(place.storage))
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(place.storage)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Several workers starting on an empty database race to create Optuna's tables; the losers retry.
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
            raise ConfigError(f"hydra.sweeper.storage={place.shown}: cannot open the study's database "
                              f"({one_line(error)})") from None
    raise AssertionError("unreachable")


_JOINED: dict[StudyPlace, tuple[Any, bool]] = {}


def join_study(place: StudyPlace, direction: str, sampler: Any = None, pruner: Any = None
               ) -> tuple[optuna.Study, bool]:
    """The study at ``place``, created if missing, and whether this process created it (the first worker).

    Remembered per process: the sweep's callback and its sweeper join once.
    """
    import optuna

    if place in _JOINED:
        study, created = _JOINED[place]
    else:
        storage = open_storage(place)
        try:
            study, created = optuna.create_study(storage=storage, study_name=place.name, direction=direction), True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(study_name=place.name, storage=storage), False
        _JOINED[place] = study, created
    if study.direction.name.lower() != str(direction).lower():
        raise ConfigError(f"hydra.sweeper.direction={direction}, but study {place.name} in {place.shown} "
                          f"{study.direction.name.lower()}s: set the same direction (objective) in every worker")
    if sampler is not None:
        study.sampler = sampler
    if pruner is not None:
        study.pruner = pruner
    return study, created


def trial_of(place: StudyPlace, number: int, pruner: Any) -> optuna.Trial:
    """Trial ``number`` of the study at ``place``, for the job that runs it to report to (pruning)."""
    import optuna

    storage = open_storage(place)
    study = optuna.load_study(study_name=place.name, storage=storage, pruner=pruner)
    study_id = storage.get_study_id_from_name(place.name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))
