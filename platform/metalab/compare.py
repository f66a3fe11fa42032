"""``metalab compare``: one table (and plots) of a metric across algorithms × task families over seeds.

Reads runs with ``mlflow.search_runs`` (through :class:`metalab.tracking.runs.RunStore`); rows and columns
are any two config keys (``algorithm`` and ``task`` by default: the chosen options, from the
``metalab.<group>`` tags; any other key is read from the params, e.g. ``task.shots``); a cell is the mean
± 95% CI of the metric over the runs that share both keys (the seeds), with Student's t quantile for their
n − 1 degrees of freedom (:mod:`metalab.stats`: over 2–5 seeds, 1.96 would be 2–6× too narrow). A cell whose
runs recorded different data (their dataset inputs' digests, :mod:`metalab.tracking.data`) gets a warning line
under the table: its runs did not see the same images. Writes
``table.md``, ``table.csv``, ``learning_curves.png`` and, where the runs vary ``task.shots``,
``accuracy_vs_shots.png`` (error bars: the same interval); with ``--sweep`` they are also logged to the sweep's
parent run, under ``compare/``. ``--sweep last`` compares the newest sweep in the store.

``--columns source`` gives Meta-Dataset's table for multi-source runs (``task=multi_source``): a column per
source (the runs' ``meta_test/<source>/post_acc``), a cell per algorithm and source, and each row's average rank
across the sources (1 = best in every source; equal means share their ranks' average). A cell of one run (one
seed) shows that run's own interval over its test tasks, marked †, as Meta-Dataset's table does.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from metalab.errors import ConfigError
from metalab.stats import INTERVAL, ci95_half_width
from metalab.tracking.runs import RunStore
from metalab.tracking.uri import DEFAULT_TRACKING_URI

matplotlib.use("Agg")
from matplotlib import pyplot as plt

DEFAULT_METRICS = ("meta_test/post_acc", "meta_test/post_return", "meta_test/post_loss")  # the first logged
Curves = dict[tuple[str, str], list[tuple[int, float]]]  # (row, column) → (step, mean across seeds) plotted
FEW_POINTS = 20  # a curve of at most this many validations marks each


@dataclass
class Comparison:
    table: pd.DataFrame  # long form: row, column, mean, ci95, n, best
    metric: str
    files: list[Path]
    warnings: list[str]  # e.g. cells mixing runs on different data
    curves: Curves  # what learning_curves.png shows
    sweep_id: str | None = None  # the sweep compared ("last" resolved)
    ranks: pd.Series | None = None  # --columns source: each row's average rank across the sources
    best_run: str | None = None  # the single run with the best value of the metric


def compare(tracking_uri: str | None = None, experiments: list[str] | None = None, sweep_id: str | None = None,
            tags: dict[str, str] | None = None, metric: str | None = None, rows: str = "algorithm",
            columns: str = "task", out: Path | None = None) -> Comparison:
    """Compare finished runs; see the module docstring. ``sweep_id="last"``: the newest sweep in the store.
    Raises ConfigError with one line for bad input."""
    store = RunStore(tracking_uri)
    if sweep_id == "last":
        sweep_id = store.latest_sweep(experiments)
    runs = store.finished_runs(experiments, ({"metalab.sweep_id": sweep_id} if sweep_id else {}) | (tags or {}))
    metric = metric or next((name for name in DEFAULT_METRICS if f"metrics.{name}" in runs), DEFAULT_METRICS[-1])
    if f"metrics.{metric}" not in runs or runs[f"metrics.{metric}"].isna().all():
        logged = sorted(c[len("metrics."):] for c in runs.columns if c.startswith("metrics.") and runs[c].notna().any())
        raise ConfigError(f"no selected run logged metric '{metric}'; these did: {', '.join(logged) or 'none'}")
    higher_is_better = "loss" not in metric  # accuracies and returns: the best cell is the highest
    if columns == SOURCE_COLUMNS:
        runs = per_source(runs.assign(_row=key_values(runs, rows)), metric)
    else:
        runs = runs.assign(_row=key_values(runs, rows), _column=key_values(runs, columns),
                           _value=runs[f"metrics.{metric}"]).dropna(subset=["_value"])
    table = summarise(runs, higher_is_better)
    ranks = average_ranks(table, higher_is_better) if columns == SOURCE_COLUMNS else None
    warnings = mixed_data(runs.assign(_data=runs["run_id"].map(store.data_digests(list(runs["run_id"])))))
    out = out or Path("reports") / (sweep_id or "compare")
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_learning_curves(store, runs, metric, out / "learning_curves.png", by_source=ranks is not None)
    files = [write_markdown(table, metric, rows, columns, out / "table.md", warnings, ranks),
             write_csv(table, out / "table.csv", ranks), out / "learning_curves.png"]
    if "params.task.shots" in runs and runs["params.task.shots"].nunique() > 1:
        files.append(plot_versus_shots(runs, metric, out / "accuracy_vs_shots.png"))
    parent = store.sweep_parent(sweep_id, experiments) if sweep_id else None
    if parent:
        store.annotate(parent, files=files, folder="compare")
    values = runs.drop_duplicates("run_id").set_index("run_id")[f"metrics.{metric}"].dropna()
    best_run = (values.idxmax() if higher_is_better else values.idxmin()) if len(values) else None
    return Comparison(table, metric, files, warnings, curves, sweep_id, ranks, best_run)


SOURCE_COLUMNS = "source"  # --columns source: Meta-Dataset's table, a column per source of multi-source runs


def per_source(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One line per run and source: ``_column`` the source, ``_value`` its ``<stage>/<source>/<name>`` metric,
    ``_run_ci`` the run's own interval over its tasks (``..._ci95``)."""
    stage, _, name = metric.partition("/")
    pattern = re.compile(rf"^metrics\.{re.escape(stage)}/([^/]+)/{re.escape(name)}$")
    found = [(match.group(1), column) for column in runs.columns if (match := pattern.match(column))]
    if not found:
        raise ConfigError(f"--columns source needs runs of several sources (task=multi_source logs {stage}/<source>/"
                          f"{name}); no selected run logged one")
    nothing = pd.Series(np.nan, index=runs.index)
    frames = [runs.assign(_column=source, _value=runs[column], _run_ci=runs.get(f"{column}_ci95", nothing))
              for source, column in sorted(found)]
    return pd.concat(frames, ignore_index=True).dropna(subset=["_value"])


def average_ranks(table: pd.DataFrame, higher_is_better: bool) -> pd.Series:
    """Each row's rank in every column (1 = best; equal means share the average of their ranks), averaged over
    the columns it has a value in."""
    means = table.pivot(index="row", columns="column", values="mean")
    return means.rank(ascending=not higher_is_better, method="average").mean(axis=1).rename("avg rank")


def key_values(runs: pd.DataFrame, key: str) -> pd.Series:
    """A config key per run: the chosen option for a group (tag ``metalab.<key>``), else the param."""
    for column in (f"tags.metalab.{key}", f"params.{key}"):
        if column in runs and runs[column].notna().any():
            return runs[column].fillna("—")
    raise ConfigError(f"no selected run has config key '{key}': use a group (algorithm, task, model) or a "
                      "param such as task.shots")


def summarise(runs: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    grouped = runs.groupby(["_row", "_column"])["_value"]
    table = grouped.agg(mean="mean", n="count", std="std").reset_index()
    table["ci95"] = [ci95_half_width(s, n) for s, n in zip(table["std"], table["n"], strict=True)]
    table["ci_of"] = "seeds"
    if "_run_ci" in runs:  # one run: no spread over seeds, so its own interval over test tasks (marked †)
        single = (table["n"] == 1).to_numpy()
        own = runs.groupby(["_row", "_column"])["_run_ci"].first().reindex(
            pd.MultiIndex.from_frame(table[["_row", "_column"]])).to_numpy()
        table.loc[single, "ci95"] = own[single]
        table.loc[single, "ci_of"] = "tasks"
    best = table.groupby("_column")["mean"].transform("max" if higher_is_better else "min")
    table["best"] = table["mean"] == best
    return table.drop(columns="std").rename(columns={"_row": "row", "_column": "column"})


def mixed_data(runs: pd.DataFrame) -> list[str]:
    """One line per cell whose runs recorded more than one data digest (``_data``; runs without one are not
    counted: nothing says what they used)."""
    lines = []
    for (row, column), group in runs.groupby(["_row", "_column"]):
        digests = sorted(group["_data"].dropna().unique())
        if len(digests) > 1:
            lines.append(f"warning: {row} × {column} mixes runs on different data (digests {', '.join(digests)}): "
                         "compare runs of one copy of the data set")
    return lines


def cell(row: pd.Series) -> str:
    interval = "" if math.isnan(row["ci95"]) else f" ± {row['ci95']:.4f}" + ("†" if row.get("ci_of") == "tasks" else "")
    text = f"{row['mean']:.4f}{interval} (n={row['n']})"
    return f"**{text}**" if row["best"] else text


def write_markdown(table: pd.DataFrame, metric: str, rows: str, columns: str, path: Path,
                   warnings: Sequence[str] = (), ranks: pd.Series | None = None) -> Path:
    pivot = table.assign(cell=table.apply(cell, axis=1)).pivot(index="row", columns="column", values="cell").fillna("—")
    if ranks is not None:
        pivot["avg rank"] = ranks.reindex(pivot.index).map("{:.2f}".format)
    header = f"| {rows} \\ {columns} | " + " | ".join(map(str, pivot.columns)) + " |"
    lines = [f"{metric}: mean ± {INTERVAL} (n = runs, the seeds); best per column in bold", "", header,
             "|" + "---|" * (len(pivot.columns) + 1)]
    lines += [f"| {index} | " + " | ".join(pivot.loc[index]) + " |" for index in pivot.index]
    if (table["ci_of"] == "tasks").any():
        lines += ["", "† one run: its own 95% CI over its test tasks, not over seeds"]
    if ranks is not None:
        lines += ["", "avg rank: each row's rank per source (1 = best; equal means share), averaged over the sources"]
    lines += ["", *warnings] if warnings else []
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(table: pd.DataFrame, path: Path, ranks: pd.Series | None = None) -> Path:
    if ranks is not None:
        table = table.assign(avg_rank=table["row"].map(ranks))
    table.to_csv(path, index=False)
    return path


def plot_learning_curves(store: RunStore, runs: pd.DataFrame, metric: str, path: Path,
                         by_source: bool = False) -> Curves:
    """The validation curve of the metric (``meta_val/...``) against step, mean ± std across seeds, one panel
    per column (``by_source``: each source's own curve, ``meta_val/<source>/...``); returns what it plotted.
    Curves of few validations get markers: one point is no line."""
    stage, _, name = metric.replace("meta_test/", "meta_val/").partition("/")
    columns = sorted(runs["_column"].unique())
    figure, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 3.6), squeeze=False)
    plotted: Curves = {}
    for axis, column in zip(axes[0], columns, strict=True):
        curve = f"{stage}/{column}/{name}" if by_source else f"{stage}/{name}"
        for row, group in runs[runs["_column"] == column].groupby("_row"):
            histories = [store.metric_history(run_id, curve) for run_id in group["run_id"]]
            steps = sorted(set().union(*histories))
            if not steps:
                continue
            values = np.array([[h.get(step, np.nan) for step in steps] for h in histories])
            mean, spread = np.nanmean(values, 0), np.nan_to_num(np.nanstd(values, 0))
            axis.plot(steps, mean, label=str(row), marker="o" if len(steps) <= FEW_POINTS else None)
            axis.fill_between(steps, mean - spread, mean + spread, alpha=0.2)
            plotted[(str(row), str(column))] = list(zip(steps, mean.tolist(), strict=True))
        axis.set(title=str(column), xlabel="meta-iteration", ylabel=curve)
        if axis.lines:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, f"no run logged {curve}", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return plotted


def plot_versus_shots(runs: pd.DataFrame, metric: str, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(5, 3.6))
    shots = pd.to_numeric(runs["params.task.shots"], errors="coerce")
    for row, group in runs.assign(_shots=shots).groupby("_row"):
        stats = group.groupby("_shots")["_value"].agg(["mean", "std", "count"])
        error = [0.0 if math.isnan(e) else e for e in map(ci95_half_width, stats["std"], stats["count"])]
        axis.errorbar(stats.index, stats["mean"], yerr=error, marker="o", capsize=3, label=str(row))
    axis.set(xlabel="shots (K)", ylabel=metric)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI}")
    parser.add_argument("--experiment", action="append", dest="experiments", help="repeatable; default: all")
    parser.add_argument("--sweep", dest="sweep_id",
                        help="a sweep id (tag metalab.sweep_id; a multirun prints it), or 'last': the newest sweep")
    parser.add_argument("--tag", action="append", default=[], help="KEY=VALUE, repeatable")
    parser.add_argument("--metric", help="default: meta_test/post_acc if logged, else meta_test/post_return "
                                         "(reinforcement learning), else meta_test/post_loss")
    parser.add_argument("--rows", default="algorithm")
    parser.add_argument("--columns", default="task",
                        help="a config key, or 'source': a column per source of multi-source runs, with average ranks")
    parser.add_argument("--out", type=Path, help="default: reports/<sweep id or 'compare'>")
    parser.add_argument("--register", metavar="NAME",
                        help="register the best run's model (by --metric) in the Model Registry as NAME, and tag the "
                             "run metalab.best")


def run(arguments: argparse.Namespace) -> None:
    tags = dict(item.split("=", 1) for item in arguments.tag if "=" in item)
    if len(tags) != len(arguments.tag):
        raise ConfigError("--tag takes KEY=VALUE")
    result = compare(arguments.tracking_uri, arguments.experiments, arguments.sweep_id, tags, arguments.metric,
                     arguments.rows, arguments.columns, arguments.out)
    if arguments.sweep_id == "last":
        print(f"sweep {result.sweep_id} (the newest)")
    print(result.files[0].read_text())
    print("wrote " + ", ".join(str(file) for file in result.files))
    if arguments.register:
        store = RunStore(arguments.tracking_uri)
        version = store.register_best(result.best_run, arguments.register, result.metric)
        print(f"best run {result.best_run} by {result.metric}: registered as models:/{arguments.register}/{version}")
