"""Paper reproductions: every preset composes, `metalab reproduce` runs end to end, and the verdict logic."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from metalab.config import experiments_dir
from metalab.job import train
from metalab.reproduce import Row, compose_preset, markdown, preset_names, reproduce, verdict
from metalab.tracking.config_hash import CONFIG_HASH_TAG, config_hash
from tests import fake_datasets
from tests.conftest import BIN

PRESETS = preset_names()


def reproduce_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return subprocess.run([str(BIN / "metalab"), "reproduce", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=600)


def test_the_issue_s_reproductions_are_all_there() -> None:
    for name in ["maml_omniglot_5w1s", "maml_omniglot_5w5s", "maml_omniglot_20w1s", "maml_omniglot_20w5s",
                 "maml_miniimagenet_5w1s", "maml_miniimagenet_5w5s", "fomaml_miniimagenet_5w1s",
                 "fomaml_miniimagenet_5w5s", "protonet_omniglot_5w1s", "protonet_omniglot_5w5s",
                 "protonet_omniglot_20w1s", "protonet_omniglot_20w5s", "protonet_miniimagenet_5w1s",
                 "protonet_miniimagenet_5w5s", "anil_miniimagenet_5w1s", "anil_miniimagenet_5w5s",
                 "metasgd_omniglot_5w1s", "metasgd_omniglot_5w5s", "reptile_omniglot_5w5s", "maml_sinusoid_k5",
                 "maml_sinusoid_k10", "maml_kanji_5w1s"]:
        assert name in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_builds(job, name: str) -> None:
    """The preset composes against the schemas, and its task, model and algorithm construct (no data read)."""
    cfg = job(f"experiment={name}")
    spec = cfg.reproduction
    assert spec.source and spec.metric in ("meta_test/post_acc", "meta_test/post_loss", "meta_test/post_return")
    assert spec.published is None or spec.tolerance > 0
    assert all(published is None or tolerance > 0 for published, tolerance in spec.also.values())
    task = instantiate(cfg.task)
    algorithm = instantiate(cfg.algorithm, model=instantiate(cfg.model))
    assert task.problem in algorithm.problems
    if task.problem == "reinforcement":  # returns before and after adaptation, the papers' curves read at 0 and 1
        assert spec.metric == "meta_test/post_return" and list(spec.also) == ["meta_test/pre_return"]
        assert spec.scale == 1 and cfg.learner.test_curve_steps == 3 and task.test_tasks >= 40
    else:
        assert task.test_tasks >= 600  # the papers' number of test tasks (or more)
    ways_in_name = name.split("_")[-1]
    if ways_in_name[0].isdigit() and "w" in ways_in_name:  # e.g. 20w5s
        ways, shots = ways_in_name.rstrip("s").split("w")
        assert (task.ways, task.shots) == (int(ways), int(shots))
    if name.startswith(("maml_mini", "fomaml_mini", "anil_mini")):
        assert cfg.model.hidden_size == 32  # Finn et al.'s mini-ImageNet network
    if name.startswith("protonet") and task.sampler == "fixed":
        assert task.train_ways > task.ways  # Snell et al. train with more ways than they test
    if cfg.reproduction.sources:  # a multi-source preset: a published number for each of its sources
        assert set(cfg.reproduction.sources) <= set(task.sources) and task.sampler == "meta_dataset"


@pytest.mark.parametrize(("ours", "published", "tolerance", "expected"), [
    (98.2, 98.7, 1.0, "within tolerance"),
    (97.7, 98.7, 1.0, "within tolerance"),  # exactly the tolerance away
    (97.5, 98.7, 1.0, "below"),
    (99.9, 98.7, 1.0, "above"),
    (0.5, None, 1.0, "no published number"),
])
def test_verdict_on_known_inputs(ours: float, published: float | None, tolerance: float, expected: str) -> None:
    assert verdict(ours, published, tolerance) == expected


def test_table_shows_paper_ours_difference_and_verdict() -> None:
    row = Row("maml_omniglot_5w1s", "Finn et al. 2017, Table 1", 98.7, 0.4, 1.0, ours=96.5, ours_ci95=0.61,
              note="max-pooling CNN4")
    table = markdown([row, Row("x", "s", 48.07, 1.75, 2.0, problem="Omniglot's data not found", data_missing=True),
                      Row("curve", "s", None, None, 0.0, ours=0.25, ours_ci95=0.031)])
    assert "| maml_omniglot_5w1s | 98.7 ± 0.4 | 96.5 ± 0.61 | -2.2 | ±1 | below |" in table
    assert "| x | 48.07 ± 1.75 | – | – | ±2 | no data |" in table  # the ± as the paper prints it
    assert "| curve | – | 0.25 ± 0.031 | – | – | no published number |" in table
    assert "- x: Omniglot's data not found" in table
    spread = markdown([Row("anil", "s", 46.7, None, 2.0, published_std_over_runs=0.4)])
    assert "| anil | 46.7 (std 0.4 over runs) | – | – | ±2 | not run |" in spread  # a spread is no interval
    protocol = table.split("Where the protocol differs from the paper's:\n")[1]
    assert protocol == "- maml_omniglot_5w1s: max-pooling CNN4\n"  # only rows with a note


def read_run(store: Path, run_id: str):
    return MlflowClient(f"sqlite:///{store}").get_run(run_id)


def test_smoke_reproduction_on_kanji_end_to_end_and_from_mlflow(tmp_path: Path, kanji_cache: str) -> None:
    result = reproduce_cli(["maml_kanji_5w1s", "--budget", "smoke", f"task.cache_dir={kanji_cache}"], tmp_path)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("| maml_kanji_5w1s |")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    ours = float(cells[2].split(" ± ")[0])
    spec = compose_preset("maml_kanji_5w1s", []).reproduction
    assert 0 <= ours <= 100 and cells[3] == "–" and cells[5] == "plumbing ok"  # two steps are never compared
    assert spec.published is not None and verdict(ours, spec.published, spec.tolerance) != "plumbing ok"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               "tags.`metalab.experiment` = 'maml_kanji_5w1s'")
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "2"
    assert run.data.tags["metalab.reproduction.verdict"] == cells[5]
    assert float(run.data.tags["metalab.reproduction.ours"]) == pytest.approx(ours, rel=1e-3)
    assert "reproduction.md" in [a.path for a in client.list_artifacts(run.info.run_id)]

    again = reproduce_cli(["maml_kanji_5w1s", "--budget", "smoke", "--from-mlflow", f"task.cache_dir={kanji_cache}",
                           "--out", "table.md"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert line in again.stdout and line in (tmp_path / "table.md").read_text()  # read back, not rerun
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow  # ~21 s; `make test` keeps the kanji reproduction end to end
def test_smoke_reproduction_on_a_generated_omniglot_folder(tmp_path: Path) -> None:
    root = fake_datasets.omniglot_tree(tmp_path / "omniglot", {"images_background": (3, 4),
                                                               "images_evaluation": (2, 4)}, drawers=6)
    result = reproduce_cli(["maml_omniglot_5w1s", "--budget", "smoke", f"task.root={root}", "task.split=lake",
                            "task.val_classes=4"], tmp_path)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("| maml_omniglot_5w1s |")]
    assert "| 98.7 ± 0.4 |" in line and "Finn, Abbeel & Levine" in result.stdout


def test_sinusoid_reproduction_logs_the_mse_curve_over_inner_steps(tmp_path: Path) -> None:
    result = reproduce_cli(["maml_sinusoid_k5", "--budget", "smoke"], tmp_path)
    assert result.returncode == 0, result.stderr
    [curve] = [line for line in result.stdout.splitlines() if line.startswith("- maml_sinusoid_k5: after 1…10")]
    assert len(curve.split(": ", 1)[1].split(", ")) == 10
    assert "| plumbing ok |" in result.stdout  # a smoke run is never compared (nor is a curve with a paper number)


def test_missing_data_is_one_line_naming_the_data_set_layout_and_root(tmp_path: Path) -> None:
    result = reproduce_cli(["protonet_miniimagenet_5w1s", "--budget", "smoke", "task.root=/nonexistent/mini"],
                           tmp_path)
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("metalab: error: protonet_miniimagenet_5w1s: mini-ImageNet's train split not found")
    assert "task.root=/nonexistent/mini" in line and "expected" in line
    assert "| protonet_miniimagenet_5w1s |" in result.stdout and "| no data |" in result.stdout
    assert (result.stdout + result.stderr).count("train split not found") == 1  # said once, as the error line


def test_unknown_reproduction_lists_the_presets(tmp_path: Path) -> None:
    result = reproduce_cli(["maml_omniglot_5w2s"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("metalab: error: no reproduction named 'maml_omniglot_5w2s'")
    assert "maml_omniglot_5w1s" in result.stderr and result.stderr.count("\n") == 1


def test_presets_live_in_the_experiments_folder() -> None:
    assert experiments_dir() == Path(__file__).resolve().parents[1] / "experiments"


def test_from_mlflow_judges_the_run_with_the_preset_s_config_not_the_newest(job, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    smoke = ["experiment=maml_sinusoid_k5", "debug=plumbing"]  # what `metalab reproduce --budget smoke` runs
    train(job(*smoke))
    train(job(*smoke, "algorithm.inner_lr=0.5"))  # newer, as many steps, another config
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    preset_run, other_run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                               order_by=["attributes.start_time ASC"])
    assert other_run.data.params["trainer.max_steps"] == preset_run.data.params["trainer.max_steps"] == "2"
    assert other_run.data.tags[CONFIG_HASH_TAG] != preset_run.data.tags[CONFIG_HASH_TAG]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")

    [row] = reproduce("maml_sinusoid_k5", budget="smoke", from_mlflow=True)
    assert row.run_id == preset_run.info.run_id
    assert row.ours == pytest.approx(preset_run.data.metrics["meta_test/post_loss"])
    table = markdown([row])
    assert f"- maml_sinusoid_k5: judged run {preset_run.info.run_id} ({preset_run.info.run_name})" in table
    assert other_run.info.run_id not in table

    [missing] = reproduce("maml_sinusoid_k5", budget="smoke", overrides=["seed=7"], from_mlflow=True)
    assert missing.run_id is None and missing.problem.startswith(
        f"no finished run of maml_sinusoid_k5 with this config ({CONFIG_HASH_TAG}=")


def test_config_hash_ignores_where_a_run_writes_and_displays_only(job, tmp_path: Path) -> None:
    base = config_hash(job("debug=plumbing"))
    assert config_hash(job("debug=plumbing", "trainer.enable_progress_bar=true", "sampling_workers=1",
                           f"tracking.tracking_uri=sqlite:///{tmp_path}/other.db")) == base
    assert config_hash(job("debug=plumbing", "seed=1")) != base
    assert config_hash(job("debug=plumbing", "task.eval_batch_size=1")) != base


@pytest.mark.slow  # ~45 s; `make test` keeps the missing-data verdict of a single preset
def test_a_sweep_preset_without_its_data_is_no_data(tmp_path: Path) -> None:
    """A sweep preset's process exits 0 when its jobs fail: the row still says why, as a single run's would."""
    result = reproduce_cli(["maml_pp_ablation_omniglot_20w1s", "--budget", "smoke", "task.root=/nonexistent/omniglot"],
                           tmp_path)
    assert result.returncode == 1
    assert "| maml_pp_ablation_omniglot_20w1s |" in result.stdout and "| no data |" in result.stdout
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "not found under task.root=/nonexistent/omniglot" in line


def test_a_meta_dataset_preset_is_judged_per_source_and_absent_sources_are_no_data(tmp_path: Path) -> None:
    """Records of three of the ten sources (aircraft and omniglot trained, traffic_sign tested only): their rows get
    our number beside the paper's, the other seven "no data"; one run, tagged per source."""
    from tests.test_meta_dataset_records import bilevel_source, flat_source

    root = tmp_path / "records"
    flat_source(root, "aircraft")
    bilevel_source(root)
    flat_source(root, "traffic_sign", per_split=(0, 0, 6))
    caches = [f"task.catalogue.{source}.cache_dir={tmp_path / 'cache'}" for source in ("aircraft", "omniglot",
                                                                                         "traffic_sign")]
    small = ["model=cnn4", "task.image_size=28"]  # the preset's ResNet-12 at 84 px takes minutes on a CI core
    result = reproduce_cli(["protonet_metadataset_all", "--budget", "smoke", f"task.root={root}", *caches, *small],
                           tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
            for line in result.stdout.splitlines() if line.startswith("| protonet_metadataset_all/")}
    assert len(rows) == 10
    for source in ("aircraft", "omniglot", "traffic_sign"):
        row = rows[f"protonet_metadataset_all/{source}"]
        assert 0 <= float(row[2].split(" ± ")[0]) <= 100 and row[5] == "plumbing ok", row
    assert rows["protonet_metadataset_all/aircraft"][1] == "71.14 ± 0.86"  # the paper's, all datasets
    for source in ("ilsvrc_2012", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower", "mscoco"):
        assert rows[f"protonet_metadataset_all/{source}"][5] == "no data"
    assert ("- protonet_metadataset_all/mscoco: run " in result.stdout
            and "has no metric meta_test/mscoco/post_acc: its source's data was not there" in result.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["metalab.reproduction.omniglot.verdict"] == "plumbing ok"
    assert run.data.tags["metalab.reproduction.fungi.verdict"] == "no data"


RL_SMALL = ["trainer.max_steps=2", "trainer.val_check_interval=2", "task.meta_batch_size=2", "task.val_tasks=2",
            "task.test_tasks=4", "task.eval_batch_size=4", "algorithm.inner_rollouts=2", "task.horizon=20",
            "model.hidden_sizes=[16]", "callbacks=none", "trainer.enable_checkpointing=false"]


def test_a_return_preset_is_judged_after_and_before_adaptation_on_rows_of_their_own(job, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                                   ) -> None:
    """The half-cheetah direction preset (shrunk): its row judges meta_test/post_return (1 step) against the figure's
    reading, its /pre_return row the return before adaptation (0 steps); both verdicts and numbers go on the run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train(job("experiment=maml_trpo_cheetah_dir", *RL_SMALL))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    after, before = reproduce("maml_trpo_cheetah_dir", overrides=RL_SMALL, from_mlflow=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("cheetah_dir").experiment_id])
    metrics, tags = run.data.metrics, client.get_run(run.info.run_id).data.tags
    assert (after.name, before.name) == ("maml_trpo_cheetah_dir", "maml_trpo_cheetah_dir/pre_return")
    assert (after.published, after.tolerance, before.published, before.tolerance) == (300.0, 50.0, 0.0, 30.0)
    assert after.ours == pytest.approx(metrics["meta_test/post_return"])
    assert before.ours == pytest.approx(metrics["meta_test/pre_return"])
    assert before.ours_ci95 == pytest.approx(metrics["meta_test/pre_return_ci95"])
    for row in (after, before):
        assert row.run_id == run.info.run_id and row.verdict == verdict(row.ours, row.published, row.tolerance)
    assert after.curve == pytest.approx([metrics[f"meta_test/post_return_step{k}"] for k in (1, 2, 3)])
    assert before.curve is None  # the curve continues after adaptation only
    assert tags["metalab.reproduction.verdict"] == after.verdict
    assert tags["metalab.reproduction.pre_return.verdict"] == before.verdict
    table = markdown([after, before])
    assert f"| maml_trpo_cheetah_dir/pre_return | 0 | {before.ours:.4g} ± {before.ours_ci95:.3g} |" in table
    assert "read off" in table and "NOT verified" in table  # the note says where the numbers come from
