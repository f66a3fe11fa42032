"""What a LightningModule records through its logger: metrics, and with MLflow also tags and figures.

``MLflowTracking.start``/``resume`` hand the Trainer an :class:`MLflowRunLogger`; the learner calls
:func:`report` with whatever ``self.logger`` is, so it never needs to know which logger (if any) it has.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH
from pytorch_lightning.loggers import Logger, MLFlowLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from metalab.tracking.client import fit_tags

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLflow logger for a run metalab opened (``run_id=``), which also records tags and figures.

    ``client``: the ``MlflowClient`` it writes with (``MLflowTracking`` gives its outbox's, whose writes never
    block a step; :mod:`metalab.tracking.outbox`), with the run's ``experiment_id``; default: Lightning's own.
    The run's status is ``MLflowTracking.finish``'s: Lightning's ``finalize`` would end the run between fit and test.

    Example:
        logger = MLflowRunLogger(tracking_uri="sqlite:///runs.db", run_id=run.info.run_id)
        logger.log_tags({"metalab.backend": "vmap"})
        logger.log_figure(figure, "inner_loop.png")  # stored as an artifact of the run; figure closed
    """

    def __init__(self, *, client: MlflowClient | None = None, experiment_id: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if client is not None:  # set up: no read of the run on first use, which an outage would fail
            self._mlflow_client, self._experiment_id, self._initialized = client, experiment_id, True

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Nothing: the run ends in ``MLflowTracking.finish``, after the test."""

    @rank_zero_only
    def log_tags(self, tags: dict[str, str]) -> None:
        """Add ``tags`` to the run, each value cut to ``MAX_TAG_LENGTH`` characters."""
        entries = [RunTag(key, value) for key, value in fit_tags(tags).items()]
        for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            self.experiment.log_batch(self.run_id, tags=entries[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_figure(self, figure: Figure, file_name: str) -> None:
        """Store ``figure`` as the run's artifact ``file_name`` (e.g. ``inner_loop.png``), then close it."""
        try:
            if rank_zero_only.rank == 0:
                self.experiment.log_figure(self.run_id, figure, file_name)
        finally:
            close(figure)  # on every rank: an open figure holds its memory until closed


class ResumedMLFlowLogger(MLflowRunLogger):
    """The logger of a resumed run: drops values at steps the run already holds."""

    def __init__(self, logged_steps: dict[str, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logged_steps = logged_steps

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {key: value for key, value in metrics.items()
                 if step is None or step > self.logged_steps.get(key, -1)}
        if fresh:
            super().log_metrics(fresh, step)


def records_figures(logger: Logger | None) -> bool:
    """Whether :func:`report` stores figures through ``logger`` (so a caller can skip drawing them)."""
    return isinstance(logger, MLflowRunLogger)


def report(logger: Logger | None, tags: Mapping[str, str] | None = None,
           figures: Mapping[str, Figure] | None = None, metrics: Mapping[str, float] | None = None,
           step: int | None = None) -> None:
    """Record tags, figures and metrics through whatever logger a LightningModule was given.

    An :class:`MLflowRunLogger` records all three; any other Lightning logger the metrics alone (tags and
    figures are MLflow's); ``None`` (``tracking=none``) nothing. The figures are closed in every case.

    Arguments:
        logger: the module's ``self.logger``.
        tags: e.g. ``{"metalab.backend": "vmap"}``; values longer than ``MAX_TAG_LENGTH`` are cut.
        figures: artifact file name → matplotlib figure, e.g. ``{"inner_loop.png": figure}``.
        metrics: name → value, logged at ``step``.
        step: the step of ``metrics``, e.g. ``self.global_step``.

    Example:
        report(self.logger, tags={"metalab.backend": "vmap"}, figures={"inner_loop.png": figure},
               metrics={"meta_train/inner_lr": 0.01}, step=self.global_step)
    """
    figures = figures or {}
    try:
        if logger is None:
            return
        if metrics:
            logger.log_metrics(dict(metrics), step)
        if isinstance(logger, MLflowRunLogger):
            if tags:
                logger.log_tags(dict(tags))
            for file_name, figure in figures.items():
                logger.log_figure(figure, file_name)
    finally:
        for figure in figures.values():
            close(figure)  # closing a closed figure does nothing


def close(figure: Figure) -> None:
    """Close a figure pyplot made (``plt.subplots``: pyplot keeps it open until closed). metalab draws plain
    ``Figure`` objects, which pyplot does not hold, so pyplot is not imported for them: a figure pyplot holds was
    made with pyplot imported."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)
