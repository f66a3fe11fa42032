"""`metalab compare`'s cells over a few seeds: Student's t intervals, and a caption that says so."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from metalab.compare import compare
from metalab.errors import ConfigError
from metalab.tracking.client import experiment_id
from metalab.tracking.data import log_data
from metalab.tracking.sweeps import open_sweep


@pytest.fixture
def three_seeds(tmp_path: Path) -> str:
    """Finished runs as training logs them: maml (3 seeds, accuracies 0.5, 0.6, 0.7) and protonet (2 seeds)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = experiment_id(client, "kanji")  # artifacts beside the store
    for algorithm, values in {"maml": [0.5, 0.6, 0.7], "protonet": [0.8, 0.9]}.items():
        for seed, value in enumerate(values):
            run = client.create_run(experiment, tags={"metalab.algorithm": algorithm, "metalab.task": "kanji"})
            client.log_param(run.info.run_id, "seed", seed)
            client.log_metric(run.info.run_id, "meta_val/post_acc", value, step=5)
            client.log_metric(run.info.run_id, "meta_test/post_acc", value, step=10)
            client.set_terminated(run.info.run_id)
    return uri


def test_cells_are_mean_and_students_t_interval_over_seeds_and_caption_names_it(three_seeds: str,
                                                                                 tmp_path: Path) -> None:
    result = compare(three_seeds, out=tmp_path / "report")
    cells = result.table.set_index("row")
    assert cells.loc["maml", "n"] == 3 and cells.loc["maml", "mean"] == pytest.approx(0.6)
    assert cells.loc["maml", "ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    assert cells.loc["protonet", "ci95"] == pytest.approx(12.706205 * 0.05, rel=1e-6)  # t(0.975, 1)·s/√2, s = 0.1/√2
    caption = (tmp_path / "report" / "table.md").read_text().splitlines()[0]
    assert caption.startswith("meta_test/post_acc: mean ± 95% CI, Student's t with n−1 degrees of freedom")
    assert "| maml | 0.6000 ± 0.2484 (n=3) |" in (tmp_path / "report" / "table.md").read_text()


def test_a_cell_mixing_runs_on_different_data_is_flagged(tmp_path: Path) -> None:
    """Two kanji copies in the maml cell (digests differ), one in the protonet cell: one warning, under the table."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = experiment_id(client, "kanji")  # artifacts beside the store
    for algorithm, digests in {"maml": ["aaaa000011112222", "bbbb000011112222"],
                               "protonet": ["aaaa000011112222", "aaaa000011112222"]}.items():
        for seed, digest in enumerate(digests):
            run = client.create_run(experiment, tags={"metalab.algorithm": algorithm, "metalab.task": "kanji"})
            log_data(client, run.info.run_id, {"name": "kanji", "source_type": "local",
                                               "source": f"/cache/{digest}.npz", "digest": digest})
            client.log_param(run.info.run_id, "seed", seed)
            client.log_metric(run.info.run_id, "meta_test/post_acc", 0.5 + seed / 10, step=10)
            client.set_terminated(run.info.run_id)

    result = compare(uri, out=tmp_path / "report")
    warning = ("warning: maml × kanji mixes runs on different data (digests aaaa000011112222, bbbb000011112222): "
               "compare runs of one copy of the data set")
    assert result.warnings == [warning]
    assert (tmp_path / "report" / "table.md").read_text().endswith(f"\n\n{warning}\n")


def test_runs_on_one_copy_of_the_data_compare_without_a_warning(three_seeds: str, tmp_path: Path) -> None:
    result = compare(three_seeds, out=tmp_path / "report")
    assert result.warnings == [] and "warning" not in (tmp_path / "report" / "table.md").read_text()


def test_a_curve_of_one_validation_is_plotted(three_seeds: str, tmp_path: Path) -> None:
    """Runs shorter than the validation interval validate once, at their end: one point per curve, still drawn."""
    result = compare(three_seeds, out=tmp_path / "report")
    assert result.curves == {("maml", "kanji"): [(5, pytest.approx(0.6))],
                             ("protonet", "kanji"): [(5, pytest.approx(0.85))]}


def test_sweep_last_is_the_newest_sweep(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match=r"--sweep last: no sweep in sqlite:///.*: start one with metalab-train -m"):
        compare(uri, sweep_id="last")
    client = MlflowClient(uri)
    for name, value in (("older", 0.5), ("newer", 0.7)):
        sweep = open_sweep(tmp_path / name, uri)
        run = client.create_run(sweep.experiment_id, tags={"metalab.sweep_id": sweep.sweep_id,
                                                           "metalab.algorithm": "maml", "metalab.task": "kanji"})
        client.log_metric(run.info.run_id, "meta_test/post_acc", value)
        client.set_terminated(run.info.run_id)
        time.sleep(0.01)  # distinct start times
    result = compare(uri, sweep_id="last", out=tmp_path / "report")
    assert result.sweep_id == sweep.sweep_id and result.table["mean"].tolist() == [0.7]
