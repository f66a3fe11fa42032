"""A run's MLflow page shows what happened: metalab's experiments are model-training experiments whose artifacts
sit beside their store, every run holds config/overrides.yaml, and a run logs its own figures (the validation
curve; one test episode of an image family)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from metalab.figures import RIGHT, WRONG, episode_grid, validation_curve
from metalab.job import train
from metalab.tasks.episodes import Task
from metalab.tracking import MLflowTracking
from metalab.tracking.base import RunInfo
from metalab.tracking.client import experiment_id
from metalab.tracking.sweeps import open_sweep
from metalab.tracking.uri import ui_page

PNG = b"\x89PNG\r\n\x1a\n"


def experiment_kind(client: MlflowClient, experiment: str) -> str | None:
    return client.get_experiment(experiment).tags.get("mlflow.experimentKind")


def test_metalab_s_experiments_are_model_training_ones_and_a_chosen_kind_stays(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    made = experiment_id(client, "sinusoid")
    by_hand = client.create_experiment("by-hand", artifact_location=str(tmp_path / "by-hand"))
    chosen = client.create_experiment("chosen", artifact_location=str(tmp_path / "chosen"),
                                      tags={"mlflow.experimentKind": "genai_development"})
    assert experiment_id(client, "sinusoid") == made
    assert (experiment_id(client, "by-hand"), experiment_id(client, "chosen")) == (by_hand, chosen)
    kinds = [experiment_kind(client, experiment) for experiment in (made, by_hand, chosen)]
    assert kinds == ["custom_model_development", "custom_model_development", "genai_development"]
    sweep = open_sweep(tmp_path / "sweep", f"sqlite:///{tmp_path}/mlflow.db")
    assert experiment_kind(client, sweep.experiment_id) == "custom_model_development"


@pytest.fixture
def tracked_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[MlflowClient, Run]:
    """A run with no overrides, opened and closed by ``MLflowTracking`` in ``tmp_path/store/mlflow.db`` from a
    process working in ``tmp_path/elsewhere``."""
    (tmp_path / "store").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    tracking = MLflowTracking(f"sqlite:///{tmp_path}/store/mlflow.db")
    tracking.start(OmegaConf.create({"seed": 0}), RunInfo("sinusoid", "maml-sinusoid", tmp_path / "out", {}, []))
    tracking.finish("FINISHED")
    client = MlflowClient(tracking.tracking_uri)
    return client, client.get_run(tracking.run_id)


def test_a_run_s_artifacts_sit_beside_its_store_whatever_the_working_directory(tracked_run, tmp_path: Path) -> None:
    client, run = tracked_run
    assert run.info.artifact_uri == str(tmp_path / "store" / "mlruns" / run.info.run_id / "artifacts")
    assert (tmp_path / "store" / "mlruns" / run.info.run_id / "artifacts" / "config" / "config.yaml").is_file()
    assert list((tmp_path / "elsewhere").iterdir()) == []  # no ./mlruns, and no ./mlflow.db either
    assert experiment_kind(client, run.info.experiment_id) == "custom_model_development"


def test_a_run_without_overrides_holds_an_empty_overrides_list(tracked_run, tmp_path: Path) -> None:
    client, run = tracked_run
    assert {artifact.path for artifact in client.list_artifacts(run.info.run_id, "config")} == {
        "config/config.yaml", "config/overrides.yaml"}
    overrides = Path(client.download_artifacts(run.info.run_id, "config/overrides.yaml", str(tmp_path)))
    assert yaml.safe_load(overrides.read_text()) == []


def test_a_resumed_run_s_curve_holds_the_validations_from_before_the_resume(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[dict[str, dict[int, float]]] = []
    monkeypatch.setattr("metalab.tracking.pending.validation_curve", drawn.append)  # draws nothing
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = MLflowTracking(uri)
    first.start(OmegaConf.create({"seed": 0}), RunInfo("sinusoid", "maml-sinusoid", tmp_path / "out", {}, [])
                ).log_metrics({"meta_val/post_loss": 2.0}, step=10)
    first.finish("KILLED")
    (tmp_path / "out" / "checkpoints").mkdir()
    (tmp_path / "out" / "checkpoints" / "last.ckpt").touch()  # what resume continues from
    second = MLflowTracking(uri)
    second.resume(first.run_id).log_metrics({"meta_val/post_loss": 1.0}, step=20)
    second.finish("FINISHED")
    assert drawn == [{"post_loss": {10: 2.0}}, {"post_loss": {10: 2.0, 20: 1.0}}]


def test_the_ui_page_asks_for_the_model_training_view() -> None:
    assert ui_page("sqlite:///mlflow.db", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert ui_page("https://mlflow.lab.example/", "3") == (
        "https://mlflow.lab.example/#/experiments/3?workflowType=machine_learning")


def history(steps: list[int], with_pre: bool, with_acc: bool) -> dict[str, dict[int, float]]:
    names = [f"{when}_{quantity}" for when in ("post", "pre")[:1 + with_pre]
             for quantity in ("loss", "acc")[:1 + with_acc]]
    return {name + suffix: {step: 0.5 + 0.01 * step for step in steps} for name in names for suffix in ("", "_ci95")}


def test_the_validation_curve_draws_each_logged_quantity_with_its_band() -> None:
    figure = validation_curve(history([10, 20, 30], with_pre=True, with_acc=True))
    loss, accuracy = figure.axes
    assert (loss.get_ylabel(), accuracy.get_ylabel()) == ("query loss", "query accuracy")
    for axes in (loss, accuracy):
        assert [line.get_label() for line in axes.lines] == ["after adaptation", "before adaptation"]
        assert [list(line.get_xdata()) for line in axes.lines] == [[10, 20, 30]] * 2
        assert len(axes.collections) == 2  # one CI band per curve
    [only] = validation_curve(history([5], with_pre=False, with_acc=False)).axes  # ProtoNet on a regression
    assert [line.get_label() for line in only.lines] == ["after adaptation"]
    assert validation_curve({}) is None  # never validated


def three_way_episode() -> tuple[Task, torch.Tensor]:
    """3 ways, 2 shots, 3 queries per class; the predictions get 2 of the 9 queries wrong."""
    labels = torch.arange(3)
    task = Task(torch.rand(6, 1, 8, 8), labels.repeat_interleave(2), torch.rand(9, 1, 8, 8),
                labels.repeat_interleave(3))
    predicted = task.query_y.clone()
    predicted[[1, 7]] = torch.tensor([2, 0])
    return task, predicted


def test_the_episode_grid_shows_support_and_queries_and_marks_each_answer() -> None:
    task, predicted = three_way_episode()
    figure = episode_grid(task, predicted)
    shown = [axes for axes in figure.axes if axes.images]
    answers = [axes.title for axes in shown if axes.get_title().startswith("→")]
    assert len(shown) == 6 + 9 and len(answers) == 9
    assert sorted(title.get_color() for title in answers) == sorted([WRONG] * 2 + [RIGHT] * 7)
    assert {title.get_text() for title in answers if title.get_color() == WRONG} == {"→ 2", "→ 0"}
    assert "7/9 right" in figure.get_suptitle()
    capped = episode_grid(task, predicted, max_ways=2, max_per_class=1)
    assert len([axes for axes in capped.axes if axes.images]) == 2 * (1 + 1)
    assert "7/9 right" in capped.get_suptitle()  # the count is the whole episode's


def figures_of(tmp_path: Path) -> dict[str, bytes]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    folder = Path(client.download_artifacts(run.info.run_id, "figures", str(tmp_path / "downloaded")))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_a_sinusoid_run_logs_its_validation_curve(job, tmp_path: Path) -> None:
    train(job("debug=plumbing"))
    figures = figures_of(tmp_path)
    assert list(figures) == ["validation_curve.png"]  # no episode grid: the inputs are not images
    assert figures["validation_curve.png"].startswith(PNG) and len(figures["validation_curve.png"]) > 5_000


KANJI = ["task=kanji", "model=cnn4", "debug=plumbing", "task.num_classes=300", "model.hidden_size=8"]


def test_a_kanji_run_logs_one_test_episode(job, tmp_path: Path, kanji_cache: str) -> None:
    train(job(*KANJI, f"task.cache_dir={kanji_cache}"))
    figures = figures_of(tmp_path)
    assert sorted(figures) == ["test_episode.png", "validation_curve.png"]
    assert figures["test_episode.png"].startswith(PNG) and len(figures["test_episode.png"]) > 5_000


def test_without_tracking_no_episode_is_drawn(job, tmp_path: Path, kanji_cache: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("drew an episode that nothing records")

    monkeypatch.setattr("metalab.learner.episode_grid", refuse)
    monkeypatch.chdir(tmp_path)
    train(job("tracking=none", *KANJI, f"task.cache_dir={kanji_cache}"))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
