"""task=multi_source: a source per training episode, each source's own splits, evaluation per source (Meta-Dataset)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from metalab.algorithms.protonet import ProtoNet
from metalab.compare import compare
from metalab.errors import ConfigError, DataMissingError
from metalab.job import train
from metalab.learner import MetaLearner
from metalab.tasks.episodes import Episodes
from metalab.tasks.images import ImageClassFamily, LabelledImages
from metalab.tasks.multi_source import MultiSource, rekeyed
from metalab.tracking.client import experiment_id


class Constant(ImageClassFamily):
    """``classes`` classes of 6 images each per split; every pixel of an image is ``value`` (its source's mark) and
    each image's class index is in its top-left pixel, so a served task says where it came from."""

    name = "constant"

    def __init__(self, *, value: int = 0, classes: int = 8, image_size: int = 6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.value, self.classes, self.image_size = value, classes, image_size

    def load_split(self, split: str) -> LabelledImages:
        labels = torch.arange(self.classes).repeat_interleave(6)
        images = torch.full((len(labels), 1, self.image_size, self.image_size), self.value, dtype=torch.uint8)
        images[:, 0, 0, 0] = labels.to(torch.uint8)
        return LabelledImages(images, labels, [f"class{c}" for c in range(self.classes)])


class HeldOutData(Constant):
    """A source with test classes only (as Meta-Dataset's Traffic Signs): reading another split fails; or none at
    all (``present=False``: its data is missing)."""

    def __init__(self, *, present: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.present = present

    def load_split(self, split: str) -> LabelledImages:
        if not self.present:
            raise DataMissingError("no records under task.root=/nowhere: expected <root>/<source>/dataset_spec.json")
        if split != "test":
            raise AssertionError(f"a test-only source's {split} split was read")
        return super().load_split(split)


def entry(value: int, classes: int = 8, size: int | None = 6) -> dict:
    config = {"_target_": f"{__name__}.Constant", "value": value, "classes": classes}
    return OmegaConf.create(config | ({"image_size": size} if size else {}))


CATALOGUE = {"a": entry(50), "b": entry(100, classes=24), "c": entry(200, size=None)}  # c: 6 px, no image_size key


def family(**settings) -> MultiSource:
    defaults = {"sources": ["a", "b", "c"], "catalogue": CATALOGUE, "test_only": ["c"], "image_size": 6,
                "meta_dataset": {"max_ways": 6, "max_support": 20}, "eval_batch_size": 4}
    made = MultiSource(**(defaults | settings))
    made.prepare()
    return made


def source_of(images: torch.Tensor) -> int:
    return int((images[0, 0, 1, 1] * 255).round())


def test_training_episodes_come_from_the_training_sources_uniformly_and_never_from_a_test_only_one() -> None:
    tasks = family().sample(400, torch.Generator().manual_seed(0), "train")
    marks = torch.tensor([source_of(task.support_x) for task in tasks])
    assert set(marks.tolist()) == {50, 100}  # c is test only
    assert abs(float((marks == 50).float().mean()) - 0.5) < 0.08  # uniform: 200 ± 2.8σ
    for task in tasks:  # one source per episode: every image carries the same mark
        assert torch.equal((task.query_x[:, 0, 1, 1] * 255).round(), torch.full((len(task.query_y),), source_of(
            task.support_x), dtype=torch.float))


def test_sources_weighted_by_classes_are_drawn_in_proportion() -> None:
    made = family(source_weights="classes")
    assert made.source_probabilities("train").tolist() == pytest.approx([8 / 32, 24 / 32])
    tasks = made.sample(400, torch.Generator().manual_seed(1), "train")
    share = sum(source_of(task.support_x) == 100 for task in tasks) / 400
    assert abs(share - 0.75) < 0.07


def test_every_source_serves_the_configured_size_and_each_evaluates_apart() -> None:
    made = family(image_size=8)  # a and b render at 8; c has no image_size and is resized
    for name in ("a", "b", "c"):
        tasks = made.sample_source(name, 3, torch.Generator().manual_seed(2), "test")
        assert tasks.source == name and all(task.support_x.shape[-2:] == (8, 8) for task in tasks)
    assert made.evaluation_sources("val") == ["a", "b"] and made.evaluation_sources("test") == ["a", "b", "c"]
    loaders = made.test_dataloader()
    assert [loader.dataset.source for loader in loaders] == ["a", "b", "c"]
    first = loaders[0].dataset[0]
    assert first.source == "a" and len(first) == 4
    again = made.test_dataloader()[0].dataset[0]  # fixed tasks: the same every time they are drawn
    assert all(torch.equal(x, y) for x, y in zip(first.support_x, again.support_x, strict=True))


def test_meta_dataset_episodes_in_each_source_follow_its_own_classes() -> None:
    tasks = family().sample_source("b", 50, torch.Generator().manual_seed(3), "train")
    ways = {int(task.support_y.max()) + 1 for task in tasks}
    assert ways <= set(range(5, 7)) and len(ways) == 2  # max_ways 6 of b's 24 classes
    assert not tasks.stacked  # ragged: ways and shots vary


def test_bad_source_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^task.sources names d, which task.catalogue lacks: its entries are "
                                          r"a, b, c$"):
        family(sources=["a", "d"])
    with pytest.raises(ConfigError, match=r"^task.test_only names b, which task.sources lacks: add it"):
        family(sources=["a"], test_only=["b"])
    with pytest.raises(ConfigError, match=r"^every source is in task.test_only: leave at least one to train on$"):
        family(sources=["c"], test_only=["c"])
    with pytest.raises(ConfigError, match=r"^task.source_weights must be uniform or classes, got 'sizes'$"):
        family(source_weights="sizes")


def test_a_test_only_source_is_read_for_its_test_split_alone() -> None:
    catalogue = CATALOGUE | {"signs": OmegaConf.create({"_target_": f"{__name__}.HeldOutData", "value": 7})}
    made = family(sources=["a", "signs"], test_only=["signs"], catalogue=catalogue)
    assert made.sample_source("signs", 2, torch.Generator().manual_seed(0), "test").source == "signs"


def test_a_source_without_its_data_stops_the_run_or_is_left_out() -> None:
    absent = OmegaConf.create({"_target_": f"{__name__}.HeldOutData", "present": False})
    catalogue = CATALOGUE | {"signs": absent}
    with pytest.raises(DataMissingError, match=r"^source signs of task=multi_source: no records under "
                                               r"task.catalogue.signs.root=/nowhere: .* \(or task.skip_missing=true "
                                               r"to go on without it\)$"):
        family(sources=["a", "signs"], test_only=["signs"], catalogue=catalogue)
    made = family(sources=["a", "signs"], test_only=["signs"], catalogue=catalogue, skip_missing=True)
    assert made.evaluation_sources("test") == ["a"] and made.sources == ["a"]
    with pytest.raises(DataMissingError, match=r"^no training source of task=multi_source has its data \(each "
                                               r"left out above\)"):
        family(sources=["signs"], test_only=[], catalogue=catalogue, skip_missing=True)


def test_a_source_error_names_the_key_where_it_is_set() -> None:
    message = rekeyed("task.root=/x: no images; set task.root, or lower task.ways", "omniglot")
    assert message == "task.catalogue.omniglot.root=/x: no images; set task.catalogue.omniglot.root, or lower task.ways"


def test_evaluation_summary_is_per_source_and_the_mean_of_the_sources() -> None:
    """Two sources' accuracies: a [1, 0, 1, 1] and b [0.5, 0.5]: per source mean ± t interval, overall the mean
    of the two means (not of the six tasks) and √(ci_a² + ci_b²) / 2."""
    learner = MetaLearner(ProtoNet(nn.Flatten()), optimizer=torch.optim.Adam, problem="classification")
    learner._per_task["a"]["post_acc"].append(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    learner._per_task["b"]["post_acc"].append(torch.tensor([0.5, 0.7]))
    logged = {}
    learner.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    learner._log_summary("meta_test")
    ci_a = 3.182446 * 0.5 / 2  # t(0.975, 3) · s / √4, s = 0.5
    ci_b = 12.706205 * math.sqrt(0.02) / math.sqrt(2)
    assert logged["meta_test/a/post_acc"] == pytest.approx(0.75)
    assert logged["meta_test/a/post_acc_ci95"] == pytest.approx(ci_a, rel=1e-5)
    assert logged["meta_test/b/post_acc"] == pytest.approx(0.6)
    assert logged["meta_test/post_acc"] == pytest.approx(0.675)
    assert logged["meta_test/post_acc_ci95"] == pytest.approx(math.hypot(ci_a, ci_b) / 2, rel=1e-5)


def test_compare_by_source_gives_meta_datasets_table_with_average_ranks(tmp_path: Path) -> None:
    """protonet: 2 seeds; maml: 1 seed (its cells show its own interval over tasks, marked †)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = experiment_id(client, "multi_source")
    scores = {"protonet": [{"kanji": 0.8, "glyphs": 0.5}, {"kanji": 0.7, "glyphs": 0.6}],
              "maml": [{"kanji": 0.6, "glyphs": 0.9}], "anil": [{"kanji": 0.5, "glyphs": 0.4}]}
    for algorithm, runs in scores.items():
        for seed, by_source in enumerate(runs):
            run = client.create_run(experiment, tags={"metalab.algorithm": algorithm, "metalab.task": "multi_source"})
            client.log_param(run.info.run_id, "seed", seed)
            for source, value in by_source.items():
                client.log_metric(run.info.run_id, f"meta_test/{source}/post_acc", value, step=10)
                client.log_metric(run.info.run_id, f"meta_test/{source}/post_acc_ci95", 0.03, step=10)
            client.log_metric(run.info.run_id, "meta_test/post_acc", sum(by_source.values()) / 2, step=10)
            client.set_terminated(run.info.run_id)
    result = compare(uri, columns="source", out=tmp_path / "report")
    cells = result.table.set_index(["row", "column"])
    assert cells.loc[("protonet", "kanji"), "mean"] == pytest.approx(0.75)
    assert cells.loc[("protonet", "kanji"), "ci95"] == pytest.approx(12.706205 * math.sqrt(0.005) / math.sqrt(2))
    assert cells.loc[("maml", "glyphs"), "ci95"] == pytest.approx(0.03)  # one run: its own interval
    # kanji: protonet 1, maml 2, anil 3; glyphs: maml 1, protonet 2 (0.55), anil 3
    assert result.ranks.to_dict() == {"anil": 3.0, "maml": 1.5, "protonet": 1.5}
    text = (tmp_path / "report" / "table.md").read_text()
    assert "| algorithm \\ source | glyphs | kanji | avg rank |" in text
    assert "| maml | **0.9000 ± 0.0300† (n=1)** | 0.6000 ± 0.0300† (n=1) | 1.50 |" in text
    single = client.create_run(experiment_id(client, "kanji"), tags={"metalab.algorithm": "maml"})
    client.log_metric(single.info.run_id, "meta_test/post_acc", 0.5)
    client.set_terminated(single.info.run_id)
    with pytest.raises(ConfigError, match=r"^--columns source needs runs of several sources \(task=multi_source logs "
                                          r"meta_test/<source>/post_acc\); no selected run logged one$"):
        compare(uri, experiments=["kanji"], columns="source", out=tmp_path / "other")


def test_a_multi_source_run_trains_and_reports_each_source(job, kanji_cache, tmp_path: Path) -> None:
    """kanji trained, Omniglot-format glyphs (on disk) tested only: per-source metrics in MLflow and their mean."""
    from tests.fake_datasets import omniglot_tree

    root = omniglot_tree(tmp_path / "omniglot", {"images_background": (2, 14), "images_evaluation": (1, 14)},
                         drawers=6)
    metrics = train(job("task=multi_source", "algorithm=protonet", "task.sources=[kanji,omniglot]",
                        "task.test_only=[omniglot]", f"task.catalogue.kanji.cache_dir={kanji_cache}",
                        "task.catalogue.kanji.num_classes=300", f"task.catalogue.omniglot.root={root}",
                        "task.catalogue.omniglot.split=lake", "task.catalogue.omniglot.val_classes=14",
                        "task.meta_dataset={max_ways: 8, max_support: 40}", "task.meta_batch_size=2",
                        "task.val_tasks=4", "task.test_tasks=8", "task.eval_batch_size=4", "model.hidden_size=16",
                        "trainer.max_steps=4", "trainer.enable_progress_bar=false"))
    for source in ("kanji", "omniglot"):
        assert 0.1 < metrics[f"meta_test/{source}/post_acc"] <= 1
    assert metrics["meta_test/post_acc"] == pytest.approx(
        (metrics["meta_test/kanji/post_acc"] + metrics["meta_test/omniglot/post_acc"]) / 2, rel=1e-5)
    assert "meta_val/kanji/post_acc" in metrics and "meta_val/omniglot/post_acc" not in metrics  # test only
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [experiment_id(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), "multi_source")])[0]
    assert {"meta_test/kanji/post_acc", "meta_test/omniglot/post_acc", "meta_test/post_acc"} <= set(run.data.metrics)


def test_ragged_tasks_whose_predictions_share_one_shape_are_recorded_per_task() -> None:
    """Support sizes differ (a ragged batch) but both tasks have 2 queries of 3 ways: the runner stacks the
    predictions, the targets stay a list; each task's loss and accuracy are still its own."""
    learner = MetaLearner(ProtoNet(nn.Flatten()), optimizer=torch.optim.Adam, problem="classification")
    tasks = Episodes([torch.zeros(3, 1), torch.zeros(5, 1)], [torch.arange(3), torch.arange(5) % 3],
                     [torch.zeros(2, 1), torch.zeros(2, 1)], [torch.tensor([0, 1]), torch.tensor([2, 2])])
    predictions = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0]], [[5.0, 0, 0], [0, 0, 5.0]]])  # task 0: 2/2, task 1: 1/2
    learner._record("post", predictions, tasks)
    assert torch.equal(learner._per_task[None]["post_acc"][0], torch.tensor([1.0, 0.5]))
