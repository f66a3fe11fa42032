"""The figures a run records of itself, so that its MLflow page shows what happened.

- :func:`validation_curve`: the ``meta_val/*`` metrics against the meta-iteration, before and after adaptation,
  with their 95% CI bands (drawn from the run's metric history when the run ends): loss, accuracy, or an RL run's
  mean episode return.
- :func:`episode_grid`: one test episode of an image family, one row per class: its support images, then its
  query images, each with the adapted predictor's label, framed green (right) or red (wrong).

Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot: no backend or global figure
list is involved (``savefig`` renders PNG with Agg), so nothing leaks however many runs one process makes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from metalab.tasks.episodes import Task  # (importing metalab.tasks imports every family: learn2learn, PIL)

VALIDATION_CURVE = "figures/validation_curve.png"  # artifact paths in the run
TEST_EPISODE = "figures/test_episode.png"
RIGHT, WRONG, SUPPORT = "tab:green", "tab:red", "0.6"
PANELS = {"loss": "query loss", "acc": "query accuracy", "return": "mean episode return"}  # RL: the learning curve
WHEN = {"post": ("after adaptation", "tab:blue"), "pre": ("before adaptation", "tab:gray")}


def validation_curve(history: Mapping[str, Mapping[int, float]]) -> Figure | None:
    """``history``: metric name without ``meta_val/`` (``post_loss``, ``post_loss_ci95``, ``pre_acc``, ...) →
    step → value. One panel per quantity logged (loss; accuracy for classification; for reinforcement learning
    the return, the post-adaptation return against meta-iteration being the learning curve of Finn et al. 2017,
    §5.3); ``None`` if the run never validated."""
    panels = [quantity for quantity in PANELS if history.get(f"post_{quantity}")]
    if not panels:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(panels), 4), layout="constrained")
    for axes, quantity in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for when, (label, colour) in WHEN.items():
            values = history.get(f"{when}_{quantity}", {})
            if not values:  # no pre_* for an algorithm without "before adaptation" (ProtoNet)
                continue
            steps = np.array(sorted(values))
            mean = np.array([values[step] for step in steps])
            axes.plot(steps, mean, marker="o", markersize=3, color=colour, label=label)
            ci95 = history.get(f"{when}_{quantity}_ci95", {})
            if all(step in ci95 for step in steps):
                half = np.array([ci95[step] for step in steps])
                axes.fill_between(steps, mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)
        axes.set(xlabel="meta-iteration", ylabel=PANELS[quantity], title="meta_val (bands: 95% CI over tasks)")
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def shows_images(task: Task) -> bool:
    """Whether ``task``'s inputs are images, (N, C, H, W) with 1 or 3 channels (not vectors or token dicts)."""
    return isinstance(task.support_x, Tensor) and task.support_x.dim() == 4 and task.support_x.shape[1] in (1, 3)


def episode_grid(task: Task, predicted: Tensor, max_ways: int = 10, max_per_class: int = 5) -> Figure:
    """One classification episode of images with ``predicted`` (the query labels the adapted predictor chose).

    Row k holds up to ``max_per_class`` support images of class k, then up to ``max_per_class`` queries whose true
    class is k, each titled with its predicted class and framed green if right, red if wrong; at most
    ``max_ways`` classes are shown. The title counts the whole episode's right answers.
    """
    support_x, support_y, query_x, query_y, predicted = (value.detach().cpu() for value in
                                                        (task.support_x, task.support_y, task.query_x, task.query_y,
                                                         predicted))
    low, high = min(support_x.min(), query_x.min()).item(), max(support_x.max(), query_x.max()).item()
    if low < 0 or high > 1:  # a family serving normalised pixels: scale the episode back into [0, 1]
        support_x, query_x = ((x - low) / max(high - low, 1e-12) for x in (support_x, query_x))
    classes = sorted(set(support_y.tolist()))[:max_ways]
    rows = [(support_x[support_y == k][:max_per_class], np.flatnonzero((query_y == k).numpy())[:max_per_class])
            for k in classes]
    shots = max(len(images) for images, _ in rows)
    columns = shots + max(len(queries) for _, queries in rows)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.1 * columns, 1.25 * len(rows) + 0.6), layout="constrained")
    grid = figure.subplots(len(rows), columns, squeeze=False)
    for k, ((images, queries), axes_row) in enumerate(zip(rows, grid, strict=True)):
        for axes in axes_row:
            axes.set_axis_off()
        for axes, image in zip(axes_row, images, strict=False):
            _show(axes, image, SUPPORT)
        axes_row[0].set_title(f"class {classes[k]}", fontsize=8, loc="left")
        for axes, index in zip(axes_row[shots:], queries, strict=False):
            right = bool(predicted[index] == query_y[index])
            _show(axes, query_x[index], RIGHT if right else WRONG)
            axes.set_title(f"→ {predicted[index].item()}", fontsize=8, color=RIGHT if right else WRONG)
    correct = int((predicted == query_y).sum())
    figure.suptitle(f"one test episode: support (grey frames) | queries labelled by the adapted model, "
                    f"{correct}/{len(query_y)} right", fontsize=9)
    return figure


def _show(axes: Axes, image: Tensor, frame: str) -> None:
    """``image`` (C, H, W) in [0, 1], framed in colour ``frame``."""
    pixels = image.permute(1, 2, 0).numpy()
    axes.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels.clip(0, 1), cmap="gray", vmin=0, vmax=1)
    axes.set_axis_on()
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(frame)
        spine.set_linewidth(2.5)
