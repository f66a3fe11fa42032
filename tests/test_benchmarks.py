"""The benchmark of meta-training speed reads what it claims: the plain learn2learn process it compares
against runs, metalab-train's "took" line parses into the phases it printed, and (b) runs in a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.meta_training import PLAIN, metalab_phases, run_process

from metalab.timing import Phases


def test_the_plain_learn2learn_process_meta_trains_and_reports_its_phases(tmp_path: Path) -> None:
    output, wall, peak = run_process([sys.executable, str(PLAIN), "sinusoid", "--steps", "3", "--test-tasks", "2"],
                                     tmp_path, terminal=False)
    phases = json.loads(output.strip().splitlines()[-1])
    assert phases["steps"] == 3 and phases["meta_train"] > 0 and phases["test"] > 0 and phases["test_loss"] > 0
    assert 0 < phases["startup"] < wall and peak > 0


def test_metalab_trains_took_line_parses_into_the_phases_it_printed() -> None:
    printed = Phases(startup=5.04, meta_train=20.26, validation=2.91, test=1.87, steps=5000)
    parsed = metalab_phases(f"MLflow run id: x\r\n\x1b[2Ktook {printed.describe()}\r\n", wall=31.0, peak=100.0)
    assert (parsed.startup, parsed.meta_train, parsed.validation, parsed.test) == (5.0, 20.3, 2.9, 1.9)


def test_metalab_runs_in_a_terminal_as_users_see_it(tmp_path: Path) -> None:
    """(b) is timed with its progress bar drawn: rich draws it only on a terminal."""
    command = [sys.executable, "-c", "import sys; print(sys.stdout.isatty())"]
    assert run_process(command, tmp_path, terminal=True)[0].strip() == "True"
    assert run_process(command, tmp_path, terminal=False)[0].strip() == "False"


def test_the_evaluation_memory_benchmark_shows_the_lazy_tasks_hold_one_batch() -> None:
    """The lazy variant holds one batch of 6 tasks, the up-front one all 60 (6.5 MB each as float)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_memory.py"
    results = {}
    for variant in ("up front", "lazily"):
        output = subprocess.run([sys.executable, str(script), "--variant", variant, "--tasks", "60",
                                 "--eval-batch-size", "6"], check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    assert results["up front"]["peak_mb"] > results["lazily"]["peak_mb"] + 200  # 60 tasks: ~390 MB up front


def test_the_plain_loops_cnn4_is_learn2learns_and_computes_metalabs_model_cnn4() -> None:
    """The baseline runs learn2learn's own CNN4; with metalab's weights it is the same function as metalab's
    ``model=cnn4`` (which pools faster), so the benchmark compares two ways of computing one network."""
    import learn2learn as l2l
    import torch
    from benchmarks.plain_learn2learn import learn2learn_cnn4

    from metalab.models import CNN4

    ours, theirs = CNN4(5).double(), learn2learn_cnn4(5).double()
    assert isinstance(theirs, l2l.vision.models.CNN4)
    theirs.load_state_dict({name.replace("head.", "classifier."): value for name, value in ours.state_dict().items()})
    images = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(theirs(images), ours(images), rtol=1e-12, atol=1e-12)
