"""metalab's Optuna sweeper (``hydra/sweeper=optuna``): one study, many workers, pruning.

Written for metalab rather than taken from ``hydra-optuna-sweeper``: its 1.3.0 pins optuna < 3, whose
database storage does not work beside the SQLAlchemy 2 that MLflow needs, so workers could not share a study,
and it has no pruning. This one runs on current Optuna with ask/tell:

- the study lives in ``hydra.sweeper.storage`` (see :mod:`metalab.search.study`); every worker naming the same
  ``study_name`` asks it for trials until it holds ``n_trials`` (over all workers), so none runs twice;
- each batch of ``n_jobs`` trials goes to Hydra's launcher (basic, joblib, SLURM), each job told its trial
  number (``hydra.sweeper.trial``) so that it reports its objective after every validation and stops when
  ``hydra.sweeper.pruner`` prunes it (:class:`metalab.search.pruning.PruneTrial`);
- a job's return is its trial's value; a failed job a failed trial; a pruned job a pruned trial.

At the end it writes Hydra's ``optimization_results.yaml`` (the study's best trial, over all workers), which
the sweep's MLflow parent run records.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from metalab.errors import ConfigError
from metalab.search.space import SearchSpace, search_space
from metalab.search.study import StudyPlace, join_study, study_place

log = logging.getLogger(__name__)

RESULTS = "optimization_results.yaml"  # Hydra's name for a search's result file
SURPLUS = "metalab.surplus"  # user attribute of a trial asked for after the study was full: never run


def check_settings(sweeper: DictConfig) -> None:
    """Refuse settings the search cannot run with, in one line, before the sweep opens its parent run."""
    if sweeper.n_trials < 1 or sweeper.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={sweeper.n_trials}, n_jobs={sweeper.n_jobs}: both must be at "
                          "least 1")
    if not 0.0 <= sweeper.max_failure_rate <= 1.0:
        raise ConfigError(f"hydra.sweeper.max_failure_rate={sweeper.max_failure_rate}: a fraction, from 0 to 1")
    if str(sweeper.direction) not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={sweeper.direction}: minimize or maximize")


class OptunaSweeper(Sweeper):
    """Ask the study for trials, launch them as Hydra jobs, tell it their values (see the module's doc)."""

    def __init__(self, direction: str, study_name: str | None, storage: str | None, n_trials: int, n_jobs: int,
                 max_failure_rate: float, sampler: Any, pruner: Any, params: DictConfig | None,
                 trial: int | None = None) -> None:
        self.direction, self.n_trials, self.n_jobs = str(direction), n_trials, n_jobs
        self.max_failure_rate = max_failure_rate
        self.sampler, self.pruner, self.params = sampler, pruner, params  # Optuna's, built by Hydra's instantiate
        del study_name, storage, trial  # read from the composed config in setup (the jobs read them there too)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.place: StudyPlace = study_place(config.hydra.sweeper, self.sweep_dir)

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        space = search_space([*(f"{key}={value}" for key, value in (self.params or {}).items()), *arguments])
        study, created = join_study(self.place, self.direction, self.sampler,
                                    self.pruner or optuna.pruners.NopPruner())
        if not created and self.sampler is not None:
            study.sampler.reseed_rng()  # a joining worker draws its own stream, not the first worker's again
        log.info(f"Study {self.place.name} in {self.place.shown}: {self.direction}, {self.n_trials} trials in all, "
                 f"{self.n_jobs} at a time here ({'created' if created else 'joined'} by this worker)")
        launched = failed = 0
        job_index = 0
        while (left := self.n_trials - len(study.get_trials(deepcopy=False))) > 0:
            trials = self._ask(study, space, min(self.n_jobs, left))
            if not trials:
                break  # other workers took the last trials
            try:
                returns = self.launcher.launch([[*space.overrides(t.params), f"hydra.sweeper.trial={t.number}"]
                                                for t in trials], initial_job_idx=job_index)
            except BaseException:  # Ctrl-C, a launcher's error: a trial left RUNNING would hold the study's parent
                for trial in trials:  # run open for ever (the last worker closes it once none runs)
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            job_index += len(returns)
            for trial, job in zip(trials, returns, strict=True):
                launched += 1
                failed += not tell(study, trial, job)
            if failed / launched > self.max_failure_rate:
                stop(f"{failed} of the {launched} trials this worker ran failed, more than hydra.sweeper."
                     f"max_failure_rate={self.max_failure_rate}: the search stops")
        self._write_results(study)

    def _ask(self, study: Any, space: SearchSpace, count: int) -> list[Any]:
        """Up to ``count`` new trials, their params sampled; a trial numbered past ``n_trials`` (another worker
        asked at the same moment) is closed unrun, marked :data:`SURPLUS`."""
        from optuna.trial import TrialState

        trials = [study.ask(space.distributions) for _ in range(count)]
        for trial in trials:
            if trial.number >= self.n_trials:
                trial.set_user_attr(SURPLUS, f"not run: the study already had its {self.n_trials} trials")
                study.tell(trial, state=TrialState.FAIL)
        return [trial for trial in trials if trial.number < self.n_trials]

    def _write_results(self, study: Any) -> None:
        """Hydra's result file: the study's best trial over all workers, and how many trials still run."""
        from optuna.trial import TrialState

        trials = [t for t in study.get_trials(deepcopy=False) if SURPLUS not in t.user_attrs]
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if not completed and not counts["running"]:
            stop(f"no trial of study {self.place.name} completed ({counts['fail']} failed, {counts['pruned']} "
                 "pruned): there is no best trial")
        results: dict[str, Any] = {"name": self.place.name, "storage": self.place.shown, "trials": counts}
        if completed:
            best = study.best_trial
            results |= {"best_trial": best.number, "best_params": best.params, "best_value": best.value}
        (self.sweep_dir / RESULTS).write_text(yaml.safe_dump(results, sort_keys=False))
        log.info(f"Study {self.place.name}: " + (f"best trial {results['best_trial']}, value "
                 f"{results['best_value']:.6g}, params {results['best_params']}" if completed else "no trial done")
                 + f"; {counts['running']} trials still running elsewhere" * bool(counts["running"]))


def tell(study: Any, trial: Any, job: Any) -> bool:
    """Record a job's end on its trial: its value (complete), pruned or failed; ``False`` if it failed."""
    from optuna.trial import TrialState

    from metalab.search.pruning import TrialPruned

    if job.status == JobStatus.FAILED:  # its exception, read without Hydra's "Error executing job" line (the
        error = job._return_value         # job printed its own: metalab's one line, or why it was pruned)
        if isinstance(error, TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)  # Optuna keeps its last reported value
            return True
        log.warning(f"Trial {trial.number} failed: {error}")
        study.tell(trial, state=TrialState.FAIL)
        return False
    try:
        value = float(job.return_value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        log.warning(f"Trial {trial.number} failed: its objective is {value}")
        study.tell(trial, state=TrialState.FAIL)
        return False
    study.tell(trial, value)
    return True


def stop(message: str) -> None:
    """End the search with one line (Hydra would print a trimmed traceback); the sweep's parent run is then
    closed FAILED at exit."""
    print(f"metalab: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)

