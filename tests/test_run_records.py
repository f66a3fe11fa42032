"""Runs that are what they say: the data a run used, the machine's load, a wall-clock budget, and a
model/input-size mismatch named with its fix."""

from __future__ import annotations

import shutil
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from metalab.checks import check_model_fits
from metalab.errors import ConfigError
from metalab.job import train
from metalab.models import MLP, ResNet12
from metalab.tasks import Omniglot, SinusoidLineRegression, SinusoidRegression
from metalab.tasks.base import TaskFamily
from metalab.tasks.episodes import Episodes
from metalab.tracking import MLflowTracking
from metalab.tracking.base import RunInfo
from metalab.tracking.mlflow_tracking import SYSTEM_METRICS_TAG
from tests import fake_datasets


def only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def test_a_run_records_its_data_as_a_dataset_input_with_the_family_s_digest(job, tmp_path: Path) -> None:
    train(job("debug=plumbing"))
    _, run = only_run(tmp_path)
    [entry] = run.inputs.dataset_inputs
    expected = SinusoidRegression().data_description()
    assert (entry.dataset.name, entry.dataset.digest, entry.dataset.source_type) == ("sinusoid", expected["digest"],
                                                                                      "code")
    assert "metalab.tasks.sinusoid.SinusoidRegression" in entry.dataset.source
    assert '\\"amplitude\\": [0.1, 5.0]' in entry.dataset.profile
    assert [(tag.key, tag.value) for tag in entry.tags] == [("mlflow.data.context", "meta-train/val/test")]


def test_a_generated_family_s_digest_follows_its_generator_not_its_episodes() -> None:
    digest = SinusoidRegression().data_description()["digest"]
    assert len(digest) == 16
    assert SinusoidRegression(shots=5, meta_batch_size=3, seed=4).data_description()["digest"] == digest
    assert SinusoidRegression(amplitude_max=4.0).data_description()["digest"] != digest
    assert SinusoidLineRegression(line_fraction=0.0).data_description()["digest"] != digest


def test_an_image_family_s_digest_follows_the_pixels_not_the_copy(tmp_path: Path) -> None:
    root = fake_datasets.omniglot_tree(tmp_path / "a", {"images_background": (2, 3), "images_evaluation": (1, 3)},
                                       drawers=3)
    copy = Path(shutil.copytree(root, tmp_path / "b"))

    def describe(where: Path) -> dict[str, str]:
        return Omniglot(root=str(where), split="lake", val_classes=2, ways=2, shots=1, queries=1).data_description()

    original = describe(root)
    assert original["source"] == str(root.resolve()) and original["source_type"] == "local"
    assert (original["train_classes"], original["val_classes"], original["test_classes"]) == ("4", "2", "3")
    assert original["test_images"] == "9"
    same = describe(copy)
    assert same["digest"] == original["digest"] and same["source"] == str(copy.resolve())
    png = next(copy.rglob("*.png"))
    Image.fromarray(np.zeros((105, 105), np.uint8)).save(png)  # one image of the copy differs
    assert describe(copy)["digest"] != original["digest"]


@pytest.fixture
def psutil_or_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """psutil as installed, else a stand-in with fixed readings: MLflow's monitor runs either way, so what is
    tested is that the run's monitor is started on the run's id and stored before the run closes."""
    before = set(sys.modules)
    try:
        import psutil  # noqa: F401 (MLflow's monitor imports it)
    except ImportError:
        reading = types.SimpleNamespace(used=2e9, total=8e9, free=6e9, percent=25.0, bytes_recv=1e6, bytes_sent=1e6)
        stand_in = types.ModuleType("psutil")
        stand_in.cpu_percent = lambda *args, **kwargs: 50.0
        stand_in.virtual_memory = stand_in.disk_usage = stand_in.net_io_counters = lambda *args, **kwargs: reading
        monkeypatch.setitem(sys.modules, "psutil", stand_in)
    yield
    for name in set(sys.modules) - before:  # MLflow's monitor modules bound to the stand-in go with it
        if name.startswith("mlflow.system_metrics"):
            del sys.modules[name]


def open_and_close(job, tmp_path: Path, seconds: float) -> tuple[MlflowClient, str]:
    """A tracked run of ``seconds`` seconds, as train.py opens and closes one."""
    tracking = MLflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    info = RunInfo("records", "a-run", tmp_path / "run", {"algorithm": "maml"}, [],
                   SinusoidRegression().data_description())
    tracking.start(job("debug=plumbing"), info)
    time.sleep(seconds)
    tracking.finish("FINISHED")
    return MlflowClient(tracking.tracking_uri), tracking.run_id


def test_a_run_records_system_metrics(job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      psutil_or_stand_in: None) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    client, run_id = open_and_close(job, tmp_path, seconds=1.0)
    run = client.get_run(run_id)
    assert run.data.tags[SYSTEM_METRICS_TAG].startswith("every 0.1 s: cpu, memory, disk, network")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 2


def test_without_psutil_the_run_goes_on_and_says_why_it_has_no_system_metrics(job, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil fails, as where it is not installed
    for name in [n for n in sys.modules if n.startswith("mlflow.system_metrics.")]:
        monkeypatch.delitem(sys.modules, name)
    client, run_id = open_and_close(job, tmp_path, seconds=0.0)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[SYSTEM_METRICS_TAG] == "off: psutil is not installed (pip install psutil)"


def test_max_time_stops_training_and_the_run_still_tests(job, tmp_path: Path) -> None:
    started = time.monotonic()
    metrics = train(job("debug=smoke", "trainer.max_steps=100000000", "trainer.max_time=00:00:00:02"))
    assert time.monotonic() - started < 120
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_time"] == "00:00:00:02"
    assert "meta_test/post_loss" in metrics and "meta_test/post_loss" in run.data.metrics
    steps = max(m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss"))
    assert 0 < steps < 100000000


class Squares(TaskFamily):
    """Grey square images of one side, 5 ways × 1 shot: only the input size matters here."""

    name = "squares"
    problem = "classification"

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def sample(self, num_tasks: int, generator: torch.Generator, split: str) -> Episodes:
        x = torch.rand((num_tasks, 5, 1, self.side, self.side), generator=generator)
        y = torch.arange(5).repeat(num_tasks, 1)
        return Episodes(x, y, x, y)


@pytest.mark.parametrize("side", [28, 64, 100])  # the pooling fails; DropBlock divides by 0; the head's size
def test_resnet12_on_the_wrong_image_size_says_which_size_it_needs(side: int) -> None:
    with pytest.raises(ConfigError) as raised:
        check_model_fits(ResNet12(ways=5, channels=1), Squares(side))
    message = str(raised.value)
    assert message.startswith(f"model ResNet12 does not take task squares's inputs of shape (5, 1, {side}, {side})")
    assert message.endswith(f"ResNet-12 needs 84×84 images (any side of 80–95 px), these are {side}×{side}: "
                            "set task.image_size=84, or use model=cnn4 (sized from the task)")


def test_resnet12_takes_84_pixels_and_other_mismatches_keep_the_general_advice() -> None:
    check_model_fits(ResNet12(ways=5, channels=1), Squares(84))
    with pytest.raises(ConfigError, match=r": this task's inputs are images: use model=cnn4 or resnet12$"):
        check_model_fits(MLP(), Squares(28))
