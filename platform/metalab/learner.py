"""The bi-level step as one LightningModule: inner loop by the algorithm, outer loop by Lightning."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from metalab.algorithms.base import Context, MetaAlgorithm
from metalab.errors import ConfigError
from metalab.figures import TEST_EPISODE, episode_grid, shows_images
from metalab.reliability import DivergenceError, kept_checkpoint, non_finite
from metalab.runner import TaskRunner
from metalab.runner.task_runner import Predictions
from metalab.stats import mean_and_ci95
from metalab.tasks.base import Problem
from metalab.tasks.episodes import Episodes, Task
from metalab.tracking import records_figures, report

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class MetaLearner(pl.LightningModule):
    """Meta-trains ``algorithm`` with the outer optimiser built by ``optimizer``.

    ``training_step``: the ``runner`` executes the meta-batch's tasks (each adapted on its support set by
    ``algorithm.adapt``, its meta-gradient by ``algorithm.task_meta_gradient``) and returns the mean query
    loss, whose ``backward()`` (Lightning's) delivers the mean meta-gradient; Lightning takes the outer
    step. Validation and test adapt on held-out tasks and log, per stage, the mean and 95% CI over tasks of
    the query loss before (``pre_``) and after (``post_``) adaptation, and accuracy for classification:
    ``meta_val/post_loss``, ``meta_val/post_loss_ci95``, ...

    Batch norm: adaptation (training and evaluation) and evaluation's predictions never write the running
    statistics (:func:`running_statistics_untouched`): learn2learn clones share them, and under
    ``runner.backend=threads`` tasks would write them at once. Instead, once per meta-iteration and before
    the outer step, ``algorithm.update_running_statistics`` runs on the meta-batch's first task (the same
    task on every process of a distributed run). So the statistics, and a checkpoint, are the same for
    every backend, and ``model.eval()`` uses statistics of the unadapted model on training episodes.
    Evaluation normalises as ``algorithm.eval_batch_norm`` says: ``transductive`` (batch norm in training
    mode: each task's own batch statistics, as MAML and learn2learn evaluate) or ``running`` (eval mode).

    Arguments:
        algorithm: the maths (:class:`~metalab.algorithms.base.MetaAlgorithm`).
        optimizer: builds the outer optimiser from the meta-parameters (a ``_partial_`` config).
        problem: ``regression`` (MSE), ``classification`` (cross-entropy) or ``reinforcement`` (returns: the
            algorithm owns its outer step and evaluates itself, :meth:`_evaluate_returns`).
        runner: how tasks are executed; ``None``: ``TaskRunner("auto")``.
        scheduler: builds a learning-rate scheduler from the optimiser, stepped every meta-iteration.
        test_curve_steps: also test after 1..n inner steps (``meta_test/post_loss_step<k>``).
    """

    def __init__(self, algorithm: MetaAlgorithm, optimizer: OptimizerFactory, problem: Problem,
                 runner: TaskRunner | None = None, scheduler: SchedulerFactory | None = None,
                 test_curve_steps: int = 0) -> None:
        super().__init__()
        if test_curve_steps and not hasattr(algorithm, "eval_inner_steps"):
            raise ConfigError(f"test_curve_steps={test_curve_steps} needs an algorithm with inner steps; "
                              f"{type(algorithm).__name__} has none: set test_curve_steps=0")
        self.algorithm = algorithm
        self.runner = runner or TaskRunner()
        self._backend_recorded = False  # the metalab.backend tag is written once, when the backend is known
        self.runner.check(algorithm)
        self.test_curve_steps = test_curve_steps
        # An algorithm that owns its outer step (e.g. TRPO) steps the optimiser itself: manual optimisation.
        self.automatic_optimization = not algorithm.owns_outer_step
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.classification = problem == "classification"
        self.reinforcement = problem == "reinforcement"
        self.loss_fn = F.cross_entropy if self.classification else F.mse_loss
        # Per source (None: the family's only one), per metric, one (T,) tensor per evaluated meta-batch.
        self._per_task: dict[str | None, dict[str, list[Tensor]]] = defaultdict(_metric_lists)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.algorithm.meta_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "step"}}

    def context(self, training: bool) -> Context:
        """What the algorithm is told: the loss, training or evaluation, and the meta-iteration."""
        return Context(self.loss_fn, training=training, step=self.global_step)

    def training_step(self, tasks: Episodes, batch_idx: int) -> Tensor | None:
        if not self.algorithm.episodic:  # stage 1 of pre-train-then-fine-tune: a batch of labelled examples
            return self._pretraining_step(*tasks)
        context = self.context(training=True)
        if self.algorithm.owns_outer_step:  # it steps the optimiser itself: statistics first, from θ before it
            self._update_running_statistics(tasks)
            with running_statistics_untouched(self.algorithm):
                predictions, meta_loss = self.algorithm.outer_step(tasks, context, self.optimizers())
            weight = 1.0
        else:  # with several processes, this one adapts its share of the meta-batch
            self._update_running_statistics(tasks)  # the whole meta-batch's first task, on every process
            tasks, weight = self.runner.share(tasks, self.global_rank, self.trainer.world_size if self._trainer else 1)
            with running_statistics_untouched(self.algorithm):
                predictions, meta_loss = self.runner.meta_loss(self.algorithm, tasks, context, agree=self._agree)
        if not torch.isfinite(meta_loss):  # one scalar check per step: stop at the first bad step
            raise DivergenceError(f"meta_train/loss is {meta_loss.item()} at step {self.global_step}: training "
                                  "diverged; lower optimizer.lr or algorithm.inner_lr; "
                                  f"{kept_checkpoint(self._trainer)}")
        if self._writes_step_metrics():
            self.log("meta_train/loss", meta_loss.detach(), batch_size=len(tasks))
            if self.classification:
                accuracy = torch.stack([self._accuracy(p, y) for p, y in zip(predictions, tasks.query_y, strict=True)])
                self.log("meta_train/post_acc", accuracy.mean(), batch_size=len(tasks))
            if self.reinforcement:  # outer_step's "predictions" are each task's post-adaptation return (T,)
                self.log("meta_train/post_return", predictions.mean(), batch_size=len(tasks))
        return meta_loss * weight if self.automatic_optimization else None

    def _pretraining_step(self, inputs: Any, labels: Tensor) -> Tensor:
        """One step of a non-episodic algorithm's pre-training (``algorithm=finetune``): a classifier over all
        training classes, its loss and accuracy logged as ``pretrain/loss`` and ``pretrain/acc``."""
        logits, loss = self.algorithm.pretraining_loss(inputs, labels)
        if not torch.isfinite(loss):
            raise DivergenceError(f"pretrain/loss is {loss.item()} at step {self.global_step}: training diverged; "
                                  f"lower optimizer.lr; {kept_checkpoint(self._trainer)}")
        if self._writes_step_metrics():
            self.log("pretrain/loss", loss.detach(), batch_size=len(labels))
            self.log("pretrain/acc", self._accuracy(logits.detach(), labels), batch_size=len(labels))
        return loss

    def _update_running_statistics(self, tasks: Episodes) -> None:
        """One momentum step of the batch-norm running statistics from the meta-batch's first task, with the
        meta-parameters before this step's update (see the class docstring)."""
        if any(module.track_running_stats for module in batch_norms(self.algorithm)):
            with torch.no_grad():
                self.algorithm.update_running_statistics(tasks[0], self.context(training=True))

    def _agree(self, backend: str) -> str:
        """Every process uses the backend rank 0 chose (their timings may differ)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return backend
        return trainer.strategy.broadcast(backend, src=0)

    def _writes_step_metrics(self) -> bool:
        """Whether the logger writes step metrics after this step (every ``trainer.log_every_n_steps``).

        ``self.log`` on the other steps only fed Lightning's result collection: ~0.45 ms a step, a tenth of
        a sinusoid meta-iteration with ``backend=vmap`` (benchmarks/meta_training.py)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is None or connector.should_update_logs

    def on_train_batch_end(self, outputs: object, batch: Episodes, batch_idx: int) -> None:
        """Record the backend the runner uses, once it is chosen (``auto``: after its probe steps)."""
        self._record_backend()

    def on_train_end(self) -> None:
        """A run shorter than ``auto``'s probe keeps the fastest backend measured (evaluation uses it too)."""
        self.runner.settle(self._agree)
        self._record_backend()

    def _record_backend(self) -> None:
        """Tag the run with the chosen backend and what ``auto`` measured (once)."""
        if self._backend_recorded or self.runner.chosen is None:
            return
        self._backend_recorded = True
        tags = {"metalab.backend": self.runner.chosen}
        if self.runner.probe:
            tags["metalab.backend_probe"] = ", ".join(f"{name} {outcome}"  # "loop 12.3 ms, vmap failed: …"
                                                      for name, outcome in self.runner.probe.items())
        report(self.logger, tags=tags)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write non-finite weights: the newest checkpoint stays the last good state to resume from."""
        name = non_finite(checkpoint)
        if name is not None:
            raise DivergenceError(f"{name} is not finite after the update of step {self.global_step - 1}: training "
                                  "diverged; lower optimizer.lr or algorithm.inner_lr; "
                                  f"{kept_checkpoint(self._trainer)}")

    def on_fit_end(self) -> None:
        """Record what the algorithm learned besides the initialisation (e.g. Meta-SGD's learning rates)."""
        learned = self.algorithm.fit_report()
        if learned is not None:
            report(self.logger, metrics=learned.metrics, figures=learned.figures, step=self.global_step)

    def validation_step(self, tasks: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        with self._evaluation_batch_norm():
            if self.reinforcement:
                self._evaluate_returns(tasks)
                return
            self._evaluate(tasks)

    def test_step(self, tasks: Episodes, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``dataloader_idx``: the source, where the family evaluates several apart (``tasks.source`` names it)."""
        with self._evaluation_batch_norm():
            if self.reinforcement:
                self._evaluate_returns(tasks, self.test_curve_steps)
                return
            predictions = self._evaluate(tasks)
            if self.test_curve_steps:
                self._curve(tasks)
        if batch_idx == 0 and dataloader_idx == 0:
            self._report_episode(tasks[0], predictions[0])

    def _report_episode(self, task: Task, prediction: Tensor) -> None:
        """Record the first test episode of an image family with the adapted model's answers (a figure of the
        run; drawn only where the logger records figures)."""
        if self.classification and shows_images(task) and records_figures(self.logger):
            report(self.logger, figures={TEST_EPISODE: episode_grid(task, prediction.argmax(dim=-1))})

    @contextmanager
    def _evaluation_batch_norm(self) -> Iterator[None]:
        """Batch norm as ``algorithm.eval_batch_norm`` says (training mode: transductive; eval mode: running
        statistics), writing no running statistics; the modules' modes are restored after. Dropout stays off."""
        norms = batch_norms(self.algorithm)
        modes = [module.training for module in norms]
        for module in norms:
            module.train(self.algorithm.eval_batch_norm == "transductive")
        try:
            with running_statistics_untouched(self.algorithm):
                yield
        finally:
            for module, mode in zip(norms, modes, strict=True):
                module.train(mode)

    def on_validation_epoch_end(self) -> None:
        self._log_summary("meta_val")

    def on_test_epoch_end(self) -> None:
        self._log_summary("meta_test")

    def _evaluate(self, tasks: Episodes) -> Predictions:
        """Record per-task pre- and post-adaptation query loss (and accuracy) for the epoch summary (batch norm
        set by :meth:`_evaluation_batch_norm`); return each task's query predictions after adaptation."""
        context = self.context(training=False)
        before = self.runner.unadapted_predictions(self.algorithm, tasks, context)
        if before is not None:  # None: no "before adaptation" (ProtoNet), so no pre_* metrics
            self._record("pre", before, tasks)
        return self._record_adapted(tasks, context)

    def adapted_predictions(self, tasks: Episodes, step: int | None = None) -> Predictions:
        """Each task's query predictions after adaptation, computed as validation and test compute them (batch norm
        as ``algorithm.eval_batch_norm`` says, evaluation's inner steps, first order, no running statistics
        written), recording nothing: what a served model answers (:mod:`metalab.serving`). ``step``: the
        meta-iteration the algorithm is told (default: this learner's; a served model passes its run's last)."""
        context = Context(self.loss_fn, training=False, step=self.global_step if step is None else step)
        with self._evaluation_batch_norm():
            return self.runner.predictions(self.algorithm, tasks, context)

    def _evaluate_returns(self, tasks: Any, curve_steps: int = 0) -> None:
        """Record each environment task's mean return before and after adaptation (``pre_return``, ``post_return``,
        ``post_return_step<k>`` for k ≤ ``curve_steps``), as the algorithm's ``evaluate`` measures them, for the
        epoch summary's mean and 95% CI over tasks."""
        for name, values in self.algorithm.evaluate(tasks, self.context(training=False), curve_steps).items():
            self._per_task[None][name].append(values.detach())

    def _curve(self, tasks: Episodes) -> None:
        """Query loss (and accuracy) after 1, 2, …, ``test_curve_steps`` inner steps: ``post_loss_step<k>``."""
        for steps in range(1, self.test_curve_steps + 1):
            context = Context(self.loss_fn, training=False, step=self.global_step, inner_steps=steps)
            self._record_adapted(tasks, context, suffix=f"_step{steps}")

    def _record_adapted(self, tasks: Episodes, context: Context, suffix: str = "") -> Predictions:
        """Adapt to each task's support set; record its query loss (and accuracy) as ``post_loss<suffix>``;
        return the query predictions (no graph)."""
        predictions = self.runner.predictions(self.algorithm, tasks, context)
        self._record("post", predictions, tasks, suffix)
        return predictions

    def _record(self, when: str, predictions: Predictions, tasks: Episodes, suffix: str = "") -> None:
        """Keep each task's query loss (and accuracy) for the epoch summary: one (T,) tensor per meta-batch, under
        the tasks' source (``None`` for a family of one source)."""
        targets, kept = tasks.query_y, self._per_task[tasks.source]
        if isinstance(predictions, Tensor):  # stacked (T, Q, *out): every task's mean in a few tensor ops
            if isinstance(targets, list):  # ragged tasks (support sizes differ) whose queries share one shape
                targets = torch.stack(targets)
            count = len(predictions)
            losses = self.loss_fn(predictions.flatten(0, 1), targets.flatten(0, 1), reduction="none")
            kept[f"{when}_loss{suffix}"].append(losses.reshape(count, -1).mean(1))
            if self.classification:
                hits = predictions.argmax(dim=-1) == targets  # (T, Q)
                kept[f"{when}_acc{suffix}"].append(hits.flatten(1).float().mean(1))
            return
        kept[f"{when}_loss{suffix}"].append(torch.stack(
            [self.loss_fn(p, y) for p, y in zip(predictions, targets, strict=True)]))
        if self.classification:
            kept[f"{when}_acc{suffix}"].append(torch.stack(
                [self._accuracy(p, y) for p, y in zip(predictions, targets, strict=True)]))

    def _log_summary(self, stage: str) -> None:
        """Mean and 95% CI over tasks of each metric: ``<stage>/<name>``. Where tasks come from named sources
        (``task=multi_source``), per source ``<stage>/<source>/<name>`` and, as ``<stage>/<name>``, the mean of the
        sources' means (each source weighs the same, as Meta-Dataset averages them), its CI from theirs:
        √(Σ ci²) / sources (independent tasks)."""
        by_name: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for source, metrics in self._per_task.items():
            for name, values in metrics.items():
                mean, ci95 = mean_and_ci95(torch.cat(values))
                if source is None:
                    self._log_metric(f"{stage}/{name}", mean, ci95)
                else:
                    self._log_metric(f"{stage}/{source}/{name}", mean, ci95)
                    by_name[name].append((mean, ci95))
        for name, summaries in by_name.items():
            means, cis = zip(*summaries, strict=True)
            self._log_metric(f"{stage}/{name}", sum(means) / len(means), math.hypot(*cis) / len(cis))
        self._per_task.clear()

    def _log_metric(self, name: str, mean: float, ci95: float) -> None:
        # Every process of a distributed run evaluates every task: the values agree, syncing is a formality.
        self.log(name, mean, sync_dist=True)
        self.log(f"{name}_ci95", ci95, sync_dist=True)

    @staticmethod
    def _accuracy(logits: Tensor, target: Tensor) -> Tensor:
        return (logits.argmax(dim=-1) == target).float().mean()


def _metric_lists() -> defaultdict[str, list[Tensor]]:
    return defaultdict(list)  # a named function, not a lambda: the learner stays picklable (ddp_spawn)


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def running_statistics_untouched(module: nn.Module) -> Iterator[None]:
    """Inside, no batch norm of ``module`` writes its running statistics (nor ``num_batches_tracked``): in
    training mode it normalises with the batch's statistics, in eval mode with the running ones, read only.

    It switches ``track_running_stats`` off, so copies made inside (learn2learn's ``clone()``, a deep copy,
    MAML++'s per-task module tree) inherit the switch; set and restored in the calling thread, around work
    that worker threads may share.
    """
    tracking = [m for m in batch_norms(module) if m.track_running_stats]
    for norm in tracking:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in tracking:
            norm.track_running_stats = True
