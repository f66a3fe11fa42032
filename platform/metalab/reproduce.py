"""``metalab reproduce NAME|all``: run a paper's preset from ``experiments/`` and state the gap to the paper.

Each preset is an ``experiment=`` option whose ``reproduction`` block holds the published number, its ±,
the source and the tolerance (:class:`metalab.config.ReproductionConfig`). For each preset this runs
``metalab-train experiment=NAME`` (``--budget smoke`` adds ``debug=plumbing``: two meta-iterations on tiny
meta-batches, to check the plumbing), or with ``--from-mlflow`` reads the latest finished run of it, then
prints one row: the paper's number ±, ours (mean ± 95% CI over the test tasks), the difference and the
verdict, and under the table which run was judged. The run judged is the newest finished one whose whole
resolved config is the preset's with the same overrides (tag ``metalab.config_hash``,
:mod:`metalab.tracking.config_hash`): a run of the preset with other overrides is never taken for it. The
verdict, difference and table are also recorded on the run (tags ``metalab.reproduction.*`` and the artifact
``reproduction.md``).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from metalab.config import config_dir, experiments_dir, register_configs
from metalab.errors import DATA_MISSING_EXIT_CODE, ConfigError
from metalab.overrides import describe
from metalab.tracking.config_hash import CONFIG_HASH_TAG, config_hash
from metalab.tracking.runs import RecordedRun, RunStore

BUDGETS = ("paper", "smoke")


@dataclass
class Row:
    """One line of the reproduction table."""

    name: str
    source: str
    published: float | None
    published_ci95: float | None
    tolerance: float
    ours: float | None = None
    ours_ci95: float | None = None
    run_id: str | None = None
    run_name: str | None = None  # the judged run's name, printed with its id under the table
    problem: str | None = None  # why there is no number of ours (the data is missing, the run failed)
    data_missing: bool = False
    curve: list[float] | None = None  # ours after 1, 2, … inner steps, when the preset logs that curve
    note: str = ""  # where the preset's protocol differs from the paper's
    published_std_over_runs: float | None = None  # a published ± that is a spread over runs, not an interval
    smoke: bool = False  # a --budget smoke run: it checks the plumbing and is never compared with the paper

    @property
    def difference(self) -> float | None:
        if self.smoke or self.ours is None or self.published is None:
            return None
        return self.ours - self.published

    @property
    def verdict(self) -> str:
        if self.ours is None:
            return "no data" if self.data_missing else "not run"
        if self.smoke:  # two meta-iterations say nothing about the paper's number
            return "plumbing ok"
        return verdict(self.ours, self.published, self.tolerance)


def verdict(ours: float, published: float | None, tolerance: float) -> str:
    """``within tolerance`` when ``|ours − published| ≤ tolerance``, else ``below`` or ``above``."""
    if published is None:
        return "no published number"
    difference = ours - published
    if abs(difference) <= tolerance:
        return "within tolerance"
    return "below" if difference < 0 else "above"


def preset_names() -> list[str]:
    return sorted(path.stem for path in experiments_dir().glob("*.yaml"))


def compose_preset(name: str, overrides: list[str]) -> DictConfig:
    """The job config of preset ``name`` with ``overrides``; ConfigError naming the problem if it does not compose."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = compose("config", overrides=[f"experiment={name}", *overrides])
        except Exception as error:  # any composition failure is one line
            raise ConfigError(f"{name}: {describe(error)}") from None
    if cfg.get("reproduction") is None:
        raise ConfigError(f"experiment={name} has no reproduction block: add one (see experiments/README.md)")
    return cfg


def run_preset(name: str, overrides: list[str]) -> tuple[int, str]:
    """Train and test the preset in its own process (its output streams to this terminal); return the exit
    status and the error line it printed, if any."""
    command = [sys.executable, "-m", "metalab.train", f"experiment={name}", *overrides]
    process = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    errors = [line for line in process.stderr.splitlines() if line.startswith("metalab: error: ")]
    if process.returncode and not errors:  # not one of ours: show what it printed
        sys.stderr.write(process.stderr)
    return process.returncode, errors[-1].removeprefix("metalab: error: ") if errors else ""


def latest_run(store: RunStore, cfg: DictConfig) -> RecordedRun | None:
    """The newest FINISHED run whose config is ``cfg`` (equal ``metalab.config_hash``)."""
    return store.latest_finished_run({CONFIG_HASH_TAG: config_hash(cfg)})


def reproduce(name: str, budget: str = "paper", overrides: list[str] | None = None,
              from_mlflow: bool = False) -> list[Row]:
    """Run (or read) preset ``name`` and return its row (a multi-source preset: a row per source); the rows are also
    recorded on the run."""
    if name not in preset_names():
        raise ConfigError(f"no reproduction named {name!r}: choose one of {', '.join(preset_names())} or all")
    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be paper or smoke, got {budget!r}")
    args = [*(["debug=plumbing"] if budget == "smoke" else []), *(overrides or [])]
    cfg = compose_preset(name, args)
    if budget == "smoke":  # the preset's own smoke overrides (e.g. a smaller data set); the user's win
        args = [args[0], *cfg.reproduction.smoke, *args[1:]]
        cfg = compose_preset(name, args)
    spec = cfg.reproduction
    rows = [Row(name, spec.source, spec.published, spec.published_ci95, spec.tolerance, note=spec.note,
                published_std_over_runs=spec.published_std_over_runs, smoke=budget == "smoke")]
    metrics_of = [spec.metric]
    if spec.sources:  # Meta-Dataset: a row per source, judged on that source's metric
        stage, _, metric_name = spec.metric.partition("/")
        rows = [Row(f"{name}/{source}", spec.source, published, ci95, spec.tolerance, note=spec.note if i == 0 else "",
                    smoke=budget == "smoke") for i, (source, (published, ci95)) in enumerate(spec.sources.items())]
        metrics_of = [f"{stage}/{source}/{metric_name}" for source in spec.sources]
    if spec.also and spec.sources:
        raise ConfigError(f"experiment={name}: reproduction.also and reproduction.sources cannot be combined: "
                          "keep one")
    for metric, (published, tolerance) in spec.also.items():  # e.g. the return before adaptation, its own row
        rows.append(Row(f"{name}/{metric.rsplit('/', 1)[-1]}", spec.source, published, None, tolerance or 0.0,
                        smoke=budget == "smoke"))
        metrics_of.append(metric)
    error = ""
    if not from_mlflow:
        status, error = run_preset(name, args)
        if status:
            for row in rows:
                row.problem, row.data_missing = error or f"exit status {status}", status == DATA_MISSING_EXIT_CODE
            return rows
    store = RunStore(cfg.tracking.get("tracking_uri"))  # tracking=none: $MLFLOW_TRACKING_URI or the default
    run = latest_run(store, cfg)
    for row, metric in zip(rows, metrics_of, strict=True):
        judge(row, name, metric, run, cfg, error, store)
    if run is not None and any(row.run_id for row in rows):
        record(store, rows)
    return rows


def judge(row: Row, name: str, metric: str, run: RecordedRun | None, cfg: DictConfig, error: str,
          store: RunStore) -> None:
    """Fill ``row`` of preset ``name`` from ``run``'s ``metric`` (or say why there is no number)."""
    spec = cfg.reproduction
    if run is None and error:  # a sweep preset exits 0 when its jobs fail: their error line says why
        # A DataMissingError's message always names task.root (metalab.errors); a single run says so by its exit status.
        row.problem, row.data_missing = error, "task.root=" in error
        return
    if run is None:
        row.problem = (f"no finished run of {name} with this config ({CONFIG_HASH_TAG}={config_hash(cfg)[:12]}…, "
                       f"the preset with the same overrides) in {store.tracking_uri}: run `metalab reproduce {name}` "
                       "first, with these overrides")
        return
    metrics = run.metrics
    row.run_id, row.run_name = run.run_id, run.name
    if metric not in metrics:
        row.problem = f"run {row.run_id} has no metric {metric}"
        if spec.sources:  # the source was left out (task.skip_missing) or not in task.sources
            row.problem += ": its source's data was not there (or it was not among task.sources)"
            row.data_missing = True
        return
    row.ours = metrics[metric] * spec.scale
    row.ours_ci95 = metrics.get(f"{metric}_ci95", math.nan) * spec.scale
    steps = int(cfg.learner.test_curve_steps or 0)
    if steps and metric not in spec.also:  # the curve continues the main metric (post_*), not pre_*
        row.curve = [metrics.get(f"{metric}_step{k}", math.nan) * spec.scale for k in range(1, steps + 1)]


def record(store: RunStore, rows: list[Row]) -> None:
    """Put the verdicts on the run: tags (a multi-source preset's per source, ``metalab.reproduction.<source>.*``)
    and ``reproduction.md``, its rows."""
    tags = {}
    for row in rows:
        prefix = "metalab.reproduction." + (f"{row.name.split('/', 1)[1]}." if "/" in row.name else "")
        tags[f"{prefix}verdict"] = row.verdict
        if row.ours is not None:
            tags[f"{prefix}ours"] = f"{row.ours:.4g}"
        if row.difference is not None:
            tags[f"{prefix}difference"] = f"{row.difference:+.4g}"
    run_id = next(row.run_id for row in rows if row.run_id)
    store.annotate(run_id, tags, texts={"reproduction.md": markdown(rows)})


def _number(value: float | None, ci95: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "–"
    if ci95 is None or math.isnan(ci95):
        return f"{value:.4g}"
    return f"{value:.4g} ± {ci95:.3g}"


def markdown(rows: list[Row], problems: bool = True) -> str:
    """The reproduction table, with the judged runs, ``problems`` (why a row has no number) and sources under it."""
    lines = ["| reproduction | paper | ours (95% CI) | difference | tolerance | verdict |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        difference = "–" if row.difference is None else f"{row.difference:+.3g}"
        tolerance = "–" if row.published is None else f"±{row.tolerance:g}"
        paper = _number(row.published, row.published_ci95)
        if row.published_std_over_runs is not None:  # not an interval: say what it is
            paper += f" (std {row.published_std_over_runs:g} over runs)"
        lines.append(f"| {row.name} | {paper} | "
                     f"{_number(row.ours, row.ours_ci95)} | {difference} | {tolerance} | {row.verdict} |")
    notes = [f"- {row.name}: judged run {row.run_id} ({row.run_name})" for row in rows if row.run_id]
    by_problem: dict[str, list[str]] = {}  # a problem shared by rows (a multi-source run's) is said once
    for row in rows:
        if row.problem and problems:
            by_problem.setdefault(row.problem, []).append(row.name)
    notes += [f"- {_names(names)}: {problem}" for problem, names in by_problem.items()]
    notes += [f"- {row.name}: after 1…{len(row.curve)} inner steps: " + ", ".join(f"{v:.4g}" for v in row.curve)
              for row in rows if row.curve]
    presets = {row.name.split("/")[0]: row for row in reversed(rows)}  # a multi-source preset's rows: said once
    sources = [f"- {preset}: {row.source}" for preset, row in reversed(presets.items())]
    differences = [f"- {row.name.split('/')[0]}: {row.note}" for row in rows if row.note]
    protocol = ["", "Where the protocol differs from the paper's:", *differences] if differences else []
    return "\n".join([*lines, "", *notes, *([""] if notes else []), "Sources:", *sources, *protocol]) + "\n"


def _names(names: list[str]) -> str:
    """Rows' names, a multi-source preset's every source as ``NAME/*``."""
    presets = {name.split("/")[0] for name in names}
    if len(names) > 1 and len(presets) == 1 and all("/" in name for name in names):
        return f"{presets.pop()}/* ({len(names)} sources)"
    return ", ".join(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"a preset of {experiments_dir()} (without .yaml), or all")
    parser.add_argument("--budget", choices=BUDGETS, default="paper",
                        help="paper: the paper's iterations and test tasks (default); smoke: a two-step plumbing check")
    parser.add_argument("--from-mlflow", action="store_true",
                        help="read the latest finished run of each preset with the same config (the preset and these "
                             "overrides) instead of training")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every preset, e.g. task.root=/data/omniglot")


def run(arguments: argparse.Namespace) -> None:
    names = preset_names() if arguments.name == "all" else [arguments.name]
    rows = [row for name in names for row in reproduce(name, arguments.budget, arguments.overrides,
                                                        arguments.from_mlflow)]
    table = markdown(rows)
    # One preset whose run failed (every row the same reason): the reason ends the output as the error line, once.
    single_failure = len(names) == 1 and all(row.problem == rows[0].problem for row in rows) and rows[0].problem
    print(f"\n{markdown(rows, problems=not single_failure)}", end="")
    if arguments.out:
        arguments.out.write_text(table)
    if single_failure:
        raise ConfigError(f"{names[0]}: {rows[0].problem}")
    # Presets without their data on this machine, or (--from-mlflow) without a run yet, are listed, not failures.
    failed = [row.name for row in rows if row.problem and not row.data_missing
              and not (arguments.from_mlflow and row.run_id is None)]
    if failed:
        raise ConfigError(f"{len(failed)} reproduction(s) did not finish: {', '.join(failed)} (see above)")
