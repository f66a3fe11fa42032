"""What a user reads in the terminal: metalab's header, its progress bar and result block, and no third-party
banners or warnings on a correct run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

LIGHTNING_CHATTER = ("GPU available", "TPU available", "Epoch 0", "FLOPs", "v_num", "Trainer.fit` stopped")


def assert_clean(stdout: str, stderr: str) -> None:
    """Nothing on stderr (no warning, no banner), and none of Lightning's own lines on stdout."""
    assert stderr == "", stderr
    assert not [line for line in stdout.splitlines() if re.search(r"warn|Tip:", line, re.IGNORECASE)], stdout
    assert not [chatter for chatter in LIGHTNING_CHATTER if chatter in stdout], stdout


def test_default_run_shows_metalab_header_progress_and_results_only(tmp_path: Path) -> None:
    result = run_cli(["trainer.max_steps=20", "task.test_tasks=10", "trainer.val_check_interval=10",
                      "trainer.log_every_n_steps=5"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_clean(result.stdout, result.stderr)
    header, budget, tracked = result.stdout.splitlines()[:3]
    assert re.fullmatch(r"metalab: maml on sinusoid, model mlp \([\d,]+ parameters\)", header), header
    assert budget.startswith("  20 meta-iterations on cpu")  # (where a GPU sits idle, a hint follows)
    assert budget.endswith(", runner backend auto (timed on the first steps)"), budget
    assert re.fullmatch(r"  tracking: sqlite:///mlflow\.db, experiment sinusoid, run maml-sinusoid-\d{8}-\d{6}",
                        tracked), tracked
    # The bar counts meta-iterations up to trainer.max_steps, with the train loss and the last validation.
    assert re.search(r"^meta-train .* 20/20 .* train loss: [\d.]+ val post_loss: [\d.]+", result.stdout,
                     re.MULTILINE), result.stdout
    assert "meta-test over 10 tasks (mean ± 95% CI):" in result.stdout
    assert re.search(r"^  post-adaptation MSE: [\d.]+ ± [\d.]+$", result.stdout, re.MULTILINE)
    assert re.search(r"^runner backend: (loop|threads|vmap) \(chosen by runner.backend=auto\)$", result.stdout,
                     re.MULTILINE)
    assert "MLflow run id: " in result.stdout
    # Where the time went, as printed and as recorded on the run; the phases add up to the total.
    took = re.search(r"^took ([\d.]+) s: start-up ([\d.]+) s, meta-training ([\d.]+) s \(\d+ it/s\), "
                     r"validation ([\d.]+) s, test ([\d.]+) s$", result.stdout, re.MULTILINE)
    assert took, result.stdout
    total, *phases = map(float, took.groups())
    assert abs(total - sum(phases)) <= 0.25, took.group(0)
    [run] = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(["1"])
    recorded = [run.data.metrics[f"time/{phase}_s"] for phase in ("startup", "meta_train", "validation", "test")]
    assert all(seconds > 0 for seconds in recorded), recorded  # printed to 0.1 s, a short validation reads 0.0
    assert [round(seconds, 1) for seconds in recorded] == phases


@pytest.mark.slow  # ~9 s; `make test` keeps the default run's terminal test
def test_kanji_run_is_as_clean(tmp_path: Path, kanji_cache: str) -> None:
    result = run_cli(["task=kanji", "task.num_classes=150", "task.max_alphabet_size=20",
                      f"task.cache_dir={kanji_cache}", "trainer.max_steps=3", "trainer.val_check_interval=3",
                      "trainer.log_every_n_steps=1", "task.meta_batch_size=2", "task.val_tasks=4",
                      "task.test_tasks=4", "tracking=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_clean(result.stdout, result.stderr)
    assert result.stdout.startswith("metalab: maml on kanji, model cnn4 (")
    assert "  tracking: none (tracking=none: nothing is recorded)" in result.stdout
    assert re.search(r"^meta-train .* 3/3 .* train loss: [\d.]+ val post_acc: [\d.]+", result.stdout, re.MULTILINE)
    assert "  post-adaptation accuracy: " in result.stdout
