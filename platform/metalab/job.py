"""One job of ``metalab-train``: instantiate → fit → test, with the tracking run closed either way.

:func:`train` takes the composed config (``metalab.train.main``, Hydra's task function, imports this module
when a job runs: ``--help`` and ``--cfg job`` import none of torch, Lightning, MLflow or learn2learn).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from metalab._quiet import held_back_trainer_banner, quiet_lightning
from metalab.checkpoints import AtomicCheckpointIO
from metalab.checks import (
    build_model,
    check_algorithm_fits,
    check_distributed,
    check_model_fits,
    require_accelerator,
    serve_examples,
)
from metalab.cuda_probe import cheap_cuda_check
from metalab.errors import ConfigError
from metalab.learner import MetaLearner
from metalab.progress import MetaProgressBar
from metalab.reliability import Terminated
from metalab.resume import plan_resume
from metalab.search.pruning import TrialPruned, trial_pruning
from metalab.serving.package import log_learner
from metalab.sweep import check_objective
from metalab.tasks.base import TaskFamily
from metalab.timing import Phases, PhaseTimer
from metalab.tracking.base import RunInfo, Tracking
from metalab.tracking.liveness import Heartbeat
from metalab.tracking.sweeps import current_sweep, job_label
from metalab.validation import ValidateAtEnd, val_check_interval

quiet_lightning()
cheap_cuda_check()


def train(cfg: DictConfig) -> dict[str, float]:
    """Meta-train and meta-test one configuration; return the last ``meta_val/*`` and the ``meta_test/*`` metrics."""
    tracking: Tracking = instantiate(cfg.tracking)
    rank = rank_zero_only.rank  # 0, except in the processes Lightning's DDP launcher starts for the others
    try:
        resume = cfg.resume
        if resume == "auto":  # a requeued job restarts in its own output folder: continue the run begun there
            resume = tracking.run_begun_in(Path(HydraConfig.get().runtime.output_dir))
        plan = None
        if resume:  # continue a run (killed, preempted) from its last checkpoint, into the same MLflow run,
            plan = plan_resume(cfg, tracking, resume)  # with its recorded settings; refused: the run is untouched
            cfg = plan.config
        task, learner = build(cfg, seed=cfg.seed + rank)
        if plan is not None:
            output_dir, checkpoint = plan.output_dir, plan.checkpoint
        else:
            info = run_info(task)
            output_dir, checkpoint = info.output_dir, None
        tracking.check()
        with held_back_trainer_banner():  # a failed check prints its one line alone
            trainer = make_trainer(cfg, output_dir)
            check_distributed(trainer, task, learner)
        if plan is not None and (apply_changes := plan.callback()) is not None:
            trainer.callbacks.append(apply_changes)  # optimiser settings go into the checkpoint as it loads
        if (pruning := trial_pruning(cfg.objective)) is not None:  # a trial of hydra/sweeper=optuna reports to
            trainer.callbacks.append(pruning)                      # its study after each validation
        if rank == 0:  # one MLflow run per job, never one per process
            logger = tracking.resume(resume) if resume else tracking.start(cfg, info)
            if plan is not None:
                plan.record(tracking)
            if logger is not None:
                trainer.logger = logger
                if trainer.world_size > 1:
                    tracking.set_tags({"metalab.world_size": str(trainer.world_size), "metalab.rank_seeds": ", ".join(
                        f"{r}:{cfg.seed + r}" for r in range(trainer.world_size))})
            header(cfg, learner, trainer, tracking, plan.choices if plan is not None else None)
            if plan is not None and plan.changes:
                print(f"  resumed with changes: {plan.describe()}", flush=True)
            if pruning is not None:
                tracking.set_tags({"metalab.optuna_study": pruning.study_name,
                                   "metalab.optuna_trial": str(pruning.trial.number)})
        with warnings.catch_warnings():
            if checkpoint:  # a resumed run goes on in its own checkpoint folder: not empty, by design
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(learner, datamodule=task, ckpt_path=checkpoint)
        if pruning is not None and pruning.pruned is not None:  # stopped on purpose: KILLED, tagged, explained
            if rank == 0:
                tracking.set_tags({"metalab.pruned": "true", "metalab.pruned_at_step": str(pruning.pruned.step),
                                   "mlflow.note.content": pruning.pruned.explanation})
            raise TrialPruned(pruning.pruned.explanation)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()
                   if name.startswith("meta_val/")}  # the last validation: what sweeps optimise
        metrics |= trainer.test(learner, datamodule=task, verbose=False)[0]
        check_objective(cfg.objective, metrics)  # a search's trial without one fails
    except BaseException as error:
        if isinstance(error, SIGTERMException):  # Lightning's: it stopped after a step (its exit status would be 0)
            error = Terminated.after(trainer, tracking.run_id)
        # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1).
        interrupted = isinstance(error, KeyboardInterrupt | SystemExit | TrialPruned)
        tracking.finish("KILLED" if interrupted else "FAILED", None if isinstance(error, TrialPruned) else error)
        if isinstance(error, Terminated):
            if rank == 0:
                print(f"metalab: stopped: {error}", file=sys.stderr, flush=True)
            error.requeue()  # after submitit's time-limit signal, with last.ckpt saved: it requeues the job, exits
            raise error from None
        raise
    if rank == 0:  # the learner as an MLflow Model that adapts to new support sets (not with tracking=none)
        log_learner(tracking, cfg, task, learner, metrics)
    tracking.finish("FINISHED")
    if rank == 0:
        report(metrics, task, tracking, backend=learner.runner.chosen if learner.runner.backend == "auto" else None,
               phases=next(c.phases for c in trainer.callbacks if isinstance(c, PhaseTimer)))
    return metrics


def build(cfg: DictConfig, seed: int) -> tuple[TaskFamily, MetaLearner]:
    """Instantiate the task family, model, algorithm and learner, checking they fit together.

    ``seed`` seeds torch's generators (``cfg.seed`` + the process's rank); the task stream follows
    ``cfg.seed`` alone, so every process of a distributed run draws the same meta-batches.
    """
    require_accelerator(cfg.hardware.accelerator)
    pl.seed_everything(seed, workers=True, verbose=False)
    task: TaskFamily = instantiate(cfg.task)
    if cfg.sampling_workers < 0:
        raise ConfigError(f"sampling_workers must be >= 0, got {cfg.sampling_workers}")
    task.sampling_workers = cfg.sampling_workers
    task.prepare()
    model = build_model(cfg, task)
    check_model_fits(model, task)
    algorithm = instantiate(cfg.algorithm, model=model)
    check_algorithm_fits(algorithm, task)
    if not algorithm.episodic:  # pre-train-then-fine-tune: meta-training is served labelled examples, and the
        algorithm.bind(serve_examples(algorithm, task))  # algorithm classifies all their classes
    scheduler = instantiate(cfg.scheduler) if cfg.scheduler is not None else None
    learner = instantiate(cfg.learner, algorithm=algorithm, optimizer=instantiate(cfg.optimizer), problem=task.problem,
                          runner=instantiate(cfg.runner), scheduler=scheduler)
    return task, learner


def make_trainer(cfg: DictConfig, output_dir: Path) -> pl.Trainer:
    """Lightning's Trainer for this job, with the callbacks of ``callbacks/`` writing into ``output_dir`` (a
    resumed run's own folder); the logger comes later."""
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    callbacks = [*(instantiate(callback) for callback in cfg.callbacks.values()), ValidateAtEnd(), Heartbeat(),
                 PhaseTimer()]
    if cfg.trainer.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(MetaProgressBar())  # meta-iterations k/max_steps, not Lightning's "Epoch 0/-2"
    interval = val_check_interval(cfg.trainer.max_steps, cfg.trainer.val_check_interval)  # null: scaled to max_steps
    return instantiate(cfg.trainer, **cfg.hardware, callbacks=callbacks, logger=False, default_root_dir=output_dir,
                       val_check_interval=interval, plugins=[AtomicCheckpointIO()],  # no truncated last.ckpt
                       inference_mode=False,  # validation/test adapt with gradients
                       use_distributed_sampler=False,  # every process evaluates every task: exact CIs
                       check_val_every_n_epoch=None)  # training tasks are an endless stream


def run_info(task: TaskFamily) -> RunInfo:
    """Names and places for this job, from Hydra's runtime: ``maml-sinusoid-<time>``, and in a sweep
    ``maml-sinusoid-seed=1-#3`` (the job's swept values and number; the parent run has the time)."""
    runtime = HydraConfig.get().runtime
    choices = {group: str(choice) for group, choice in runtime.choices.items()
               if choice is not None and not group.startswith("hydra")}
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        suffix = job_label(current_sweep(), skip=("algorithm", "task"))  # the name begins with these two
    else:
        suffix = datetime.now().strftime("%Y%m%d-%H%M%S")
    return RunInfo(experiment_name=task.name, run_name=f"{choices.get('algorithm', 'run')}-{task.name}-{suffix}",
                   output_dir=Path(runtime.output_dir), choices=choices,
                   overrides=list(HydraConfig.get().overrides.task), data=task.data_description())


def header(cfg: DictConfig, learner: MetaLearner, trainer: pl.Trainer, tracking: Tracking,
           choices: Mapping[str, str] | None = None) -> None:
    """The lines a user reads at the start of a run: what runs, on what, and where it is recorded (``choices``:
    the config groups' options, a resumed run's recorded ones; default: this command line's)."""
    choices = choices or HydraConfig.get().runtime.choices
    parameters = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    steps = "meta-iterations" if learner.algorithm.episodic else "pre-training steps"
    budget = " or ".join(([f"{trainer.max_steps} {steps}"] if trainer.max_steps > 0 else []) +
                         ([f"max_time {cfg.trainer.max_time}"] if cfg.trainer.max_time else [])) or "no step limit"
    backend = learner.runner.backend
    if backend == "auto":  # pre-training has no episodes to time: evaluation then adapts task by task
        backend += " (timed on the first steps)" if learner.algorithm.episodic else " (evaluation: loop)"
    print(f"metalab: {choices.get('algorithm')} on {choices.get('task')}, model {choices.get('model')} "
          f"({parameters:,} parameters)")
    print(f"  {budget} on {device(trainer)}, runner backend {backend}")
    print(f"  tracking: {tracking.describe()}", flush=True)


def device(trainer: pl.Trainer) -> str:
    """``cpu``, ``cuda (NVIDIA H100 80GB HBM3)``, ``cpu, 2 processes`` ... and a hint where a GPU sits idle."""
    kind = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    if kind == "cuda":
        kind += f" ({torch.cuda.get_device_name(trainer.strategy.root_device)})"
    elif torch.cuda.is_available():  # said here instead of Lightning's "GPU available but not used" warning
        kind += " (a CUDA GPU is visible: hardware=gpu uses it)"
    return kind if trainer.world_size == 1 else f"{kind}, {trainer.world_size} processes"


def report(metrics: dict[str, float], task: TaskFamily, tracking: Tracking, backend: str | None = None,
           phases: Phases | None = None) -> None:
    """The lines a user reads at the end of a run (``backend``: the one ``runner.backend=auto`` chose;
    ``phases``: where the time went)."""
    metric, label = {"classification": ("acc", "accuracy"), "reinforcement": ("return", "return")}.get(
        task.problem, ("loss", "MSE"))
    sources = task.evaluation_sources("test")
    each = " of each source" if sources else ""
    print(f"\nmeta-test over {task.test_tasks} tasks{each} (mean ± 95% CI):")
    for when in ("pre", "post"):
        if f"meta_test/{when}_{metric}" not in metrics:  # no "before adaptation" for this algorithm (ProtoNet)
            continue
        mean, ci95 = metrics[f"meta_test/{when}_{metric}"], metrics[f"meta_test/{when}_{metric}_ci95"]
        print(f"  {when}-adaptation {label}: {mean:.4f} ± {ci95:.4f}" + (" (the sources' mean)" if sources else ""))
        width = max(map(len, sources), default=0)
        for source in sources:
            name = f"meta_test/{source}/{when}_{metric}"
            print(f"    {source:<{width}}  {metrics[name]:.4f} ± {metrics[f'{name}_ci95']:.4f}")
    steps = sorted(int(name.rsplit("step", 1)[1]) for name in metrics if task.problem == "reinforcement"
                   and name.startswith(f"meta_test/post_{metric}_step") and not name.endswith("_ci95"))
    for step in steps:  # learner.test_curve_steps: the inner-step curve
        name = f"meta_test/post_{metric}_step{step}"
        plural = "s" if step > 1 else ""
        print(f"  after {step} inner step{plural}: {metrics[name]:.4f} ± {metrics[f'{name}_ci95']:.4f}")
    if backend:
        print(f"runner backend: {backend} (chosen by runner.backend=auto)")
    if phases is not None:
        print(f"took {phases.describe()}")
    if tracking.run_id:
        print(f"MLflow run id: {tracking.run_id}")
        print(f"Open the MLflow UI: make ui  (then {tracking.ui_page()})")
