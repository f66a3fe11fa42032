"""The bi-level step as one LightningModule: inner loop by the algorithm, outer loop by Lightning."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from pytorch_lightning.loggers import MLFlowLogger
from torch import Tensor, nn
from torch.optim import Optimizer

from metalab.algorithms.base import MetaAlgorithm
from metalab.errors import ConfigError
from metalab.reliability import DivergenceError
from metalab.stats import mean_and_ci95
from metalab.tasks.base import Problem
from metalab.tasks.episodes import Episodes

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


class MetaLearner(pl.LightningModule):
    """Meta-trains ``algorithm`` with the outer optimiser built by ``optimizer``.

    ``training_step``: for each task of the meta-batch, ``algorithm.adapt`` adapts the model on the
    support set; the adapted model's query loss, averaged over tasks (``algorithm.meta_loss``), is
    returned and Lightning takes the outer step. Validation and test adapt on held-out tasks (gradients
    enabled) and log, per stage, the mean and 95% CI over tasks of the query loss before (``pre_``) and
    after (``post_``) adaptation, and accuracy for classification: ``meta_val/post_loss``,
    ``meta_val/post_loss_ci95``, ...
    """

    def __init__(self, algorithm: MetaAlgorithm, optimizer: OptimizerFactory, problem: Problem,
                 test_curve_steps: int = 0) -> None:
        super().__init__()
        if test_curve_steps and not hasattr(algorithm, "eval_inner_steps"):
            raise ConfigError(f"test_curve_steps={test_curve_steps} needs an algorithm with inner steps; "
                              f"{type(algorithm).__name__} has none: set test_curve_steps=0")
        self.algorithm = algorithm
        self.test_curve_steps = test_curve_steps
        # Reptile's outer step is no gradient of a loss: it writes .grad itself (manual optimisation).
        self.automatic_optimization = algorithm.autograd_meta_gradient
        self.optimizer_factory = optimizer
        self.classification = problem == "classification"
        self.loss_fn = F.cross_entropy if self.classification else F.mse_loss
        self._per_task: dict[str, list[Tensor]] = defaultdict(list)

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory(self.algorithm.parameters())

    def training_step(self, tasks: Episodes, batch_idx: int) -> Tensor:
        if self.automatic_optimization:
            predictions, meta_loss = self.algorithm.meta_loss(tasks, self.loss_fn, self.task_losses)
        else:  # the algorithm writes the meta-gradient itself (Reptile)
            optimizer = self.optimizers()
            optimizer.zero_grad()
            predictions = self.algorithm.write_meta_gradient(tasks, self.loss_fn)
            optimizer.step()
            meta_loss = self.task_losses(predictions, tasks.query_y).mean()
        if not torch.isfinite(meta_loss):  # one scalar check per step: stop at the first bad step
            raise DivergenceError(f"meta_train/loss is {meta_loss.item()} at step {self.global_step}: training "
                                  "diverged; lower optimizer.lr or algorithm.inner_lr (last.ckpt holds the last "
                                  "good state)")
        if self._writes_step_metrics():
            self.log("meta_train/loss", meta_loss, batch_size=len(tasks))
            if self.classification:
                accuracy = torch.stack([self._accuracy(p, y) for p, y in zip(predictions, tasks.query_y, strict=True)])
                self.log("meta_train/post_acc", accuracy.mean(), batch_size=len(tasks))
        return meta_loss

    def _writes_step_metrics(self) -> bool:
        """Whether the logger writes step metrics after this step (every ``trainer.log_every_n_steps``).

        ``self.log`` on the other steps only fed Lightning's result collection: ~0.45 ms a step, a tenth of
        a sinusoid meta-iteration with ``backend=vmap`` (benchmarks/meta_training.py)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is None or connector.should_update_logs

    def task_losses(self, predictions: list[Tensor] | Tensor, targets: Tensor) -> Tensor:
        """Each task's mean query loss, (T,). Stacked predictions (T, Q, *out) take one batched call."""
        if isinstance(predictions, Tensor):
            flat = self.loss_fn(predictions.flatten(0, 1), targets.flatten(0, 1), reduction="none")
            return flat.reshape(len(targets), -1).mean(1)
        return torch.stack([self.loss_fn(p, y) for p, y in zip(predictions, targets, strict=True)])

    def on_train_batch_end(self, outputs: object, batch: Episodes, batch_idx: int) -> None:
        """Record the inner-loop backend ``auto`` chose (once, after the first meta-batch)."""
        chosen = getattr(self.algorithm, "chosen_backend", None)
        if batch_idx == 0 and chosen and isinstance(self.logger, MLFlowLogger):
            timings = ", ".join(f"{name} {seconds * 1000:.1f} ms"
                                for name, seconds in getattr(self.algorithm, "probe_seconds", {}).items())
            self.logger.experiment.set_tag(self.logger.run_id, "metalab.backend", chosen)
            if timings:
                self.logger.experiment.set_tag(self.logger.run_id, "metalab.backend_probe", timings)

    def on_fit_end(self) -> None:
        """Record what the algorithm learned besides the initialisation (e.g. Meta-SGD's learning rates)."""
        report = self.algorithm.fit_report() if self.logger is not None else None
        if report is None:
            return
        self.logger.log_metrics(report.metrics, step=self.global_step)
        for name, figure in report.figures.items():
            if isinstance(self.logger, MLFlowLogger):
                self.logger.experiment.log_figure(self.logger.run_id, figure, name)
            plt.close(figure)

    def validation_step(self, tasks: Episodes, batch_idx: int) -> None:
        self._evaluate(tasks)

    def test_step(self, tasks: Episodes, batch_idx: int) -> None:
        self._evaluate(tasks)
        if self.test_curve_steps:
            self._curve(tasks)

    def on_validation_epoch_end(self) -> None:
        self._log_summary("meta_val")

    def on_test_epoch_end(self) -> None:
        self._log_summary("meta_test")

    def _evaluate(self, tasks: Episodes) -> None:
        """Record per-task pre- and post-adaptation query loss (and accuracy) for the epoch summary."""
        # Transductive batch norm, as MAML and learn2learn evaluate: each task normalises with its own
        # batch statistics (running statistics, averaged over tasks, fit no single task). Dropout stays off.
        for module in self.algorithm.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
        with torch.no_grad():
            for query_x, query_y in zip(tasks.query_x, tasks.query_y, strict=True):
                before = self.algorithm.model(query_x)
                self._record("pre", self.loss_fn(before, query_y), before, query_y)
        self._record_adapted(tasks)

    def _curve(self, tasks: Episodes) -> None:
        """Query loss (and accuracy) after 1, 2, …, ``test_curve_steps`` inner steps: ``post_loss_step<k>``."""
        configured = self.algorithm.eval_inner_steps
        try:
            for steps in range(1, self.test_curve_steps + 1):
                self.algorithm.eval_inner_steps = steps
                self._record_adapted(tasks, suffix=f"_step{steps}")
        finally:
            self.algorithm.eval_inner_steps = configured

    def _record_adapted(self, tasks: Episodes, suffix: str = "") -> None:
        """Adapt to each task's support set; record its query loss (and accuracy) as ``post_loss<suffix>``."""
        with torch.enable_grad():  # Lightning evaluates under no_grad; the inner loop needs gradients
            predictions = self.algorithm.query_predictions(tasks, self.loss_fn, training=False)
        for after, query_y in zip(predictions, tasks.query_y, strict=True):
            after = after.detach()
            self._record("post", self.loss_fn(after, query_y), after, query_y, suffix)

    def _record(self, when: str, loss: Tensor, prediction: Tensor, target: Tensor, suffix: str = "") -> None:
        self._per_task[f"{when}_loss{suffix}"].append(loss)
        if self.classification:
            self._per_task[f"{when}_acc{suffix}"].append(self._accuracy(prediction, target))

    def _log_summary(self, stage: str) -> None:
        for name, values in self._per_task.items():
            mean, ci95 = mean_and_ci95(torch.stack(values))
            # Every process of a distributed run evaluates every task: the values agree, syncing is a formality.
            self.log(f"{stage}/{name}", mean, sync_dist=True)
            self.log(f"{stage}/{name}_ci95", ci95, sync_dist=True)
        self._per_task.clear()

    @staticmethod
    def _accuracy(logits: Tensor, target: Tensor) -> Tensor:
        return (logits.argmax(dim=-1) == target).float().mean()
