"""`metalab-train` as a user runs it: the embedded default store, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from metalab.overrides import split_flags
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_logs_to_the_default_store_in_the_working_directory(tmp_path: Path) -> None:
    result = run_cli(["debug=smoke"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "post-adaptation MSE:" in result.stdout and "make ui" in result.stdout
    run_id = result.stdout.split("MLflow run id: ")[1].split()[0]
    assert "Gym has been unmaintained" not in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # MLflow's embedded default, in the cwd
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "sinusoid"
    assert run.data.params["trainer.max_steps"] == "20"  # the preset's value
    hydra_files = {a.path for a in client.list_artifacts(run_id, "config/hydra")}
    assert hydra_files == {"config/hydra/config.yaml", "config/hydra/hydra.yaml", "config/hydra/overrides.yaml"}
    assert Path(run.data.tags["metalab.checkpoint_dir"], "last.ckpt").is_file()


def test_python_module_entry_point_and_env_tracking_uri(tmp_path: Path) -> None:
    store = tmp_path / "elsewhere.db"
    result = run_cli(["debug=smoke", "algorithm=fomaml"], cwd=tmp_path, module=True,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.data.params["algorithm.first_order"] == "True"
    assert run.info.run_name.startswith("fomaml-sinusoid-")



@pytest.mark.parametrize(("uri", "problem"), [
    ("sqlite:///{tmp}/missing/x.db", "folder {tmp}/missing does not exist or is not writable"),
    ("sqlite:///{tmp}/a-file/x.db", "folder {tmp}/a-file does not exist or is not writable"),
    ("nonsense://x", "MLflow has no tracking store for this URI"),
], ids=["missing folder", "file as folder", "unknown scheme"])
def test_unusable_env_tracking_uri_is_one_line_naming_the_variable(tmp_path: Path, uri: str, problem: str) -> None:
    (tmp_path / "a-file").write_text("")
    uri, problem = uri.format(tmp=tmp_path), problem.format(tmp=tmp_path)
    result = run_cli(["debug=smoke"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"metalab: error: MLFLOW_TRACKING_URI={uri}: {problem}: set MLFLOW_TRACKING_URI to ")
    assert "or unset it" in lines[0] and "tracking.tracking_uri" not in lines[0]  # the user never typed that key
    assert not (tmp_path / "mlflow.db").exists()



def test_unusable_env_tracking_uri_stops_a_sweep_before_its_jobs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/missing/x.db"
    result = run_cli(["-m", "debug=smoke", "seed=0,1"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"metalab: error: MLFLOW_TRACKING_URI={uri}: folder {tmp_path}/missing does not")
    assert "Launching" not in result.stdout and not (tmp_path / "missing").exists()  # no job ran, nothing created


BAD_INPUTS = [
    (["algorithm.inner_lrr=0.1"], "unknown config key 'algorithm.inner_lrr': did you mean 'algorithm.inner_lr'?"),
    (["trainer.max_step=3"], "'trainer.max_step'"),
    (["algorithm.inner_lr=abc"], "bad value for 'algorithm.inner_lr'"),
    (["task.shots=1.5"], "bad value for 'task.shots'"),
    (["seed=x"], "bad value for 'seed'"),
    (["algorithm=reptilian"],
     "unknown algorithm 'reptilian': choose one of anil, finetune, fomaml, imaml, maml, maml_pp, maml_trpo, "
     "metaoptnet, metasgd, protomaml, protonet, r2d2, reptile"),
    (["task=nope"], "unknown task 'nope'"),
    (["experiment=nope"], "unknown experiment 'nope': choose one of anil_miniimagenet_5w1s, "),
    (["algorithm=maml,fomaml"], "--multirun"),
    (["algorithm.inner_lr"], "key=value"),
    (["algorithm.inner_lr=-1"], "algorithm.inner_lr must be > 0"),
    (["algorithm.inner_steps=0"], "algorithm.inner_steps must be >= 1"),
    (["task.shots=0"], "task.shots"),
    (["task.meta_batch_size=0"], "task.meta_batch_size must be >= 1"),
    (["model.hidden_sizes=[40,0]"], "model sizes must be >= 1"),
    (["task=omniglot", "task.root=/nonexistent/omniglot"],
     "Omniglot's images_background and images_evaluation not found under task.root=/nonexistent/omniglot"),
    (["task=mini_imagenet", "task.root=/nonexistent"], "mini-ImageNet's train split not found under task.root="),
    (["task=folder"], "task.root must be set"),
    (["task=omniglot", "task.split=vinyls"], "task.split must be one of lake, vinyals, maml, got 'vinyls'"),
    (["task=kanji", "model=cnn4", "task.ways=0"], "task.ways must be >= 1"),
    (["algorithm=protonet"], "algorithm=protonet learns classification tasks only, and task=sinusoid is regression"),
    (["task=kanji", "model=mlp", "task.num_classes=150", "task.max_alphabet_size=20", "task.cache_dir=cache"],
     "model MLP does not take task kanji's inputs of shape (5, 1, 28, 28)"),
    (["task=kanji", "task.train_ways=20", "task.num_classes=150", "task.max_alphabet_size=20", "task.cache_dir=cache"],
     "task.train_ways=20 differs from task.ways=5, but algorithm=maml predicts with a head of one output per way"),
    (["hardware=ddp_cpu", "task.meta_batch_size=1"],
     "task.meta_batch_size=1 gives some of the 2 processes of this run no task: make it at least 2"),
    (["hardware=ddp_cpu", "algorithm=finetune", "task=kanji", "task.num_classes=150", "task.max_alphabet_size=20",
      "task.cache_dir=cache"], "algorithm=finetune pre-trains on mini-batches of examples that every process would"),
    (["runner.backend=vmap", "algorithm=reptile"],
     "runner.backend=vmap: Reptile declares no vectorised_adapt, so it cannot run vectorised"),
    (["runner.backend=loops"], "runner.backend must be loop, threads, vmap or auto, got 'loops'"),
    (["algorithm=reptile", "algorithm.inner_optimizer=rmsprop"], "algorithm.inner_optimizer must be sgd or adam"),
    (["optimizer.lr=fast"], "bad value for 'optimizer.lr'"),
    (["task.test_tasks=-1"], "task.test_tasks must be >= 1"),
    (["task=kanji", "task.ways=5000", "task.num_classes=150", "task.max_alphabet_size=20", "task.cache_dir=cache"],
     "task.ways=5000 but the train split of kanji has only"),
    (["task=kanji", "task.shots=5", "task.queries=20", "task.num_classes=150", "task.max_alphabet_size=20",
      "task.cache_dir=cache"], "task.shots + task.queries = 25 but a train class of kanji has only 20 images"),
    (["task=omniglot", "task.root=/proc/1/root/forbidden"],
     "task.root=/proc/1/root/forbidden: cannot read /proc/1/root/forbidden/images_background (Permission denied)"),
    (["tracking.tracking_uri=sqlite:////nonexistent/folder/mlflow.db"], "does not exist or is not writable"),
    (["tracking.tracking_uri=http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 does not answer"),
    (["-m", "algorithm=maml,,fomaml"], "Error parsing override"),
    (["resume=0123456789abcdef0123456789abcdef"], "no MLflow run with that id"),
    (["model=lstm"], "unknown model 'lstm': choose one of cnn4, gaussian_mlp, mlp, resnet12, text_cnn, transformer"),
    (["hydra.run.dir=/proc/metalab-out"], "cannot create the output folder /proc/metalab-out"),
    (["algorithm=maml_schema"], "algorithm=maml_schema is the schema of an option, not an option: choose one of "
                                "anil, finetune, fomaml, imaml, maml, maml_pp, maml_trpo, metaoptnet, metasgd, "
                                "protomaml, protonet, r2d2, reptile"),
    (["-m", "task=sinusoid,kanji_schema"], "task=kanji_schema is the schema of an option"),
    (["-m", "seed=0,1", "--cfg", "job"], "--cfg shows one job and cannot be combined with -m: drop -m"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["hardware=gpu"], "hardware=gpu needs a CUDA device"))


def assert_one_clear_line(status: int, stdout: str, stderr: str, message: str, folder: Path) -> None:
    assert status != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("metalab: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in stdout
    if (folder / "mlflow.db").exists():  # nothing half-written: no run left RUNNING (or at all)
        with sqlite3.connect(folder / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone()[0] == 0


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    """Every BAD_INPUTS command line run by the console entry point in one process (tests/cli_batch.py): a start-up
    for all (~10 s) instead of one each (8-18 s, ~45 of them); each in a folder of its own."""
    folders = {case_id(overrides): tmp_path_factory.mktemp("bad-input") for overrides, _ in BAD_INPUTS}
    commands = [{"args": ["debug=smoke", *overrides], "cwd": str(folders[case_id(overrides)])}
                for overrides, _ in BAD_INPUTS]
    environment = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI",
                                                                                   "HYDRA_FULL_ERROR")}
    # As on a SLURM login node: an `srun` on PATH makes Lightning hint at it (hardware=ddp_cpu's case), which
    # metalab drops; the one line must stay one line.
    bin_folder = tmp_path_factory.mktemp("bin")
    (bin_folder / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_folder / "srun").chmod(0o755)
    environment["PATH"] = f"{bin_folder}{os.pathsep}{environment.get('PATH', '')}"
    batch = subprocess.run([sys.executable, "-m", "tests.cli_batch"], input=json.dumps(commands), cwd=ROOT,
                           env=environment, capture_output=True, text=True, timeout=1200)
    assert batch.returncode == 0, batch.stderr
    return {command_id: (result, folders[command_id]) for command_id, result in
            zip((case_id(overrides) for overrides, _ in BAD_INPUTS), json.loads(batch.stdout), strict=True)}


def case_id(overrides: list[str]) -> str:
    return " ".join(overrides)


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[case_id(o) for o, _ in BAD_INPUTS])
def test_bad_input_exits_with_one_clear_line_and_no_run(bad_input_results, overrides: list[str], message: str) -> None:
    result, folder = bad_input_results[case_id(overrides)]
    assert_one_clear_line(result["status"], result["stdout"], result["stderr"], message, folder)


# A few of them as processes of their own, as a user runs them (the batch above runs the same entry point in one
# process): an override refused before Hydra starts, a config error, a build error, a data error, a tracking error.
OWN_PROCESS = ["algorithm.inner_lrr=0.1", "algorithm=reptilian", "algorithm.inner_lr=-1",
               "task=omniglot task.root=/nonexistent/omniglot", "tracking.tracking_uri=http://127.0.0.1:9"]


@pytest.mark.parametrize(("overrides", "message"), [case for case in BAD_INPUTS if case_id(case[0]) in OWN_PROCESS],
                         ids=OWN_PROCESS)
def test_bad_input_as_its_own_process_exits_with_one_clear_line(tmp_path: Path, overrides: list[str],
                                                                message: str) -> None:
    result = run_cli(["debug=smoke", *overrides], cwd=tmp_path)
    assert_one_clear_line(result.returncode, result.stdout, result.stderr, message, tmp_path)


def test_full_error_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli(["debug=smoke", "algorithm.inner_lr=-1"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr



def test_help_names_metalab_train_and_lists_options_without_their_schemas(tmp_path: Path) -> None:
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("metalab-train: "), result.stdout[:200]
    groups = dict(line.split(": ", 1) for line in result.stdout.split("== Config groups", 1)[1]
                  .split("== Config (key=value)")[0].splitlines()[1:] if ": " in line)
    assert groups["algorithm"].split(", ") == ["anil", "finetune", "fomaml", "imaml", "maml", "maml_pp", "maml_trpo",
                                               "metaoptnet", "metasgd", "protomaml", "protonet", "r2d2", "reptile"]
    assert groups["model"] == "cnn4, gaussian_mlp, mlp, resnet12, text_cnn, transformer"
    assert {"sinusoid", "kanji", "nav2d", "pendulum", "cheetah_vel", "cheetah_dir"} <= set(groups["task"].split(", "))
    assert groups["tracking"] == "mlflow, none"
    assert "maml_omniglot_5w1s" in groups["experiment"]
    assert "_schema" not in result.stdout and "powered by Hydra" not in result.stdout
    assert "inner_lr: 0.01" in result.stdout  # the composed config follows


def test_corrupt_data_file_is_one_line_naming_it(tmp_path: Path) -> None:
    for split in ("train", "validation", "test"):
        (tmp_path / f"mini-imagenet-cache-{split}.pkl").write_bytes(b"this is not a pickle")
    result = run_cli(["debug=smoke", "task=mini_imagenet", f"task.root={tmp_path}"], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"{tmp_path}/mini-imagenet-cache-train.pkl is not a mini-ImageNet pickle" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("args", "flags", "overrides"), [
    (["--cfg", "job", "seed=1"], ["--cfg", "job"], ["seed=1"]),
    (["seed=1", "-c", "hydra"], ["-c", "hydra"], ["seed=1"]),
    (["--info", "defaults", "seed=1"], ["--info", "defaults"], ["seed=1"]),
    (["--info", "seed=1"], ["--info"], ["seed=1"]),
    (["-m", "seed=0,1"], ["-m"], ["seed=0,1"]),
])
def test_flag_values_are_not_taken_for_overrides(args: list[str], flags: list[str], overrides: list[str]) -> None:
    assert split_flags(args) == (flags, overrides)
