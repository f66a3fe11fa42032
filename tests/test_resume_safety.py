"""A resume goes on with the run's recorded settings, refuses in one line what it cannot honour, and never
changes a run it could not start; a checkpoint is written whole or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from metalab.checkpoints import AtomicCheckpointIO, check_resumable, read_checkpoint
from metalab.errors import ConfigError
from metalab.job import make_trainer, train
from metalab.resume import merge, resolved
from tests.conftest import compose_job, run_cli

SMOKE = ["debug=smoke", "runner.backend=loop", "trainer.log_every_n_steps=1"]  # 20 steps, test_tasks 20


def only_run(store: str) -> Any:
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    return run


def snapshot(store: str, run_id: str) -> tuple[Any, ...]:
    """What a resume that could not start must leave as it was: status, end time, tags, metrics, artifacts."""
    client = MlflowClient(store)
    run = client.get_run(run_id)
    steps = {name: [m.step for m in client.get_metric_history(run_id, name)] for name in run.data.metrics}
    return (run.info.status, run.info.end_time, run.data.tags, steps,
            sorted(a.path for a in client.list_artifacts(run_id, "config")))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A finished 20-step run: (its working folder, tracking URI, run id). Tests using it must leave it as it is."""
    folder = tmp_path_factory.mktemp("finished")
    store = f"sqlite:///{folder}/mlflow.db"
    result = run_cli([*SMOKE, f"tracking.tracking_uri={store}"], cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, store, only_run(store).info.run_id


def test_resume_with_a_differing_setting_is_refused_in_one_line_and_leaves_the_run_as_it_was(finished) -> None:
    folder, store, run_id = finished
    before = snapshot(store, run_id)
    result = run_cli([f"tracking.tracking_uri={store}", f"resume={run_id}", "task.test_tasks=30", "seed=4"],
                     cwd=folder)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith(f"metalab: error: resume={run_id}: the command line changes settings the run was "
                           "recorded with: task.test_tasks: 20 → 30, task.seed: 0 → 4, seed: 0 → 4. ")  # ${seed}
    assert line.endswith("A resumed run keeps its recorded settings except keys in resume_allow: drop these "
                         "overrides, or allow them with 'resume_allow=[trainer.max_steps,trainer.max_time,optimizer.lr,"
                         "algorithm.inner_lr,task.test_tasks,task.seed,seed]'")
    assert snapshot(store, run_id) == before


def test_truncated_checkpoint_is_one_line_naming_it_and_an_older_one_and_leaves_the_run_as_it_was(finished) -> None:
    folder, store, run_id = finished
    last = Path(MlflowClient(store).get_run(run_id).data.tags["metalab.checkpoint_dir"], "last.ckpt")
    whole = last.read_bytes()
    before = snapshot(store, run_id)
    try:
        last.write_bytes(whole[:len(whole) // 2])  # what a copy killed halfway leaves
        result = run_cli([f"tracking.tracking_uri={store}", f"resume={run_id}"], cwd=folder)
    finally:
        last.write_bytes(whole)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert f"resume={run_id}: checkpoint {last} is unreadable (truncated or corrupt: " in line
    assert (f"the newest readable checkpoint beside it is epoch=0-step=20.ckpt (step 20); to continue from it, run "
            f"cp '{last.parent}/epoch=0-step=20.ckpt' '{last}' and then the same command again") in line
    assert snapshot(store, run_id) == before  # still FINISHED, same end time, no tag added


def test_resume_extends_a_run_with_a_new_learning_rate_that_takes_effect_and_is_tagged(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    first = run_cli([*SMOKE, f"tracking.tracking_uri={store}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_id = only_run(store).info.run_id
    hash_before = only_run(store).data.tags["metalab.config_hash"]
    # Only the changes on the command line: the rest (debug=smoke's 20 test tasks ...) is the run's recorded config.
    resumed = run_cli([f"tracking.tracking_uri={store}", f"resume={run_id}", "trainer.max_steps=40",
                       "optimizer.lr=0.0001"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    changes = "optimizer.lr: 0.001 → 0.0001, trainer.max_steps: 20 → 40 at step 20"
    assert f"resumed with changes: {changes}" in resumed.stdout
    assert "meta-test over 20 tasks" in resumed.stdout  # the recorded task.test_tasks, not the default 600

    run = only_run(store)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["metalab.resume_changes"] == changes
    assert run.data.tags["metalab.config_hash"] != hash_before  # no longer one config's computation
    client = MlflowClient(store)
    assert sorted(m.step for m in client.get_metric_history(run_id, "meta_train/loss")) == list(range(40))
    validations = [m.step for m in client.get_metric_history(run_id, "meta_val/post_loss")]
    assert sorted(validations) == [9, 19, 29, 39]  # every 10 steps (recorded), each once
    checkpoint = torch.load(Path(run.data.tags["metalab.checkpoint_dir"], "last.ckpt"), map_location="cpu")
    assert checkpoint["global_step"] == 40
    assert [group["lr"] for group in checkpoint["optimizer_states"][0]["param_groups"]] == [0.0001]
    in_effect = yaml.safe_load(Path(client.download_artifacts(run_id, "config/resumed_config.yaml", str(tmp_path)))
                               .read_text())
    assert in_effect["optimizer"]["lr"] == 0.0001 and in_effect["trainer"]["max_steps"] == 40


def test_requeued_job_goes_through_the_same_check(tmp_path: Path) -> None:
    """``resume=auto``: an allowed change is applied and tagged, a refused one leaves the run as it was."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    settings = [f"tracking.tracking_uri={store}", "debug=smoke", "resume=auto", "runner.backend=loop"]
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=10"]))
    run_id = only_run(store).info.run_id
    before = snapshot(store, run_id)
    with pytest.raises(ConfigError, match=rf"^resume=auto \(run {run_id}\): the command line changes settings the "
                                          r"run was recorded with: task.val_tasks: 10 → 5\. "):
        train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=10", "task.val_tasks=5"]))
    assert snapshot(store, run_id) == before
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=20", "algorithm.inner_lr=0.02"]))
    assert only_run(store).data.tags["metalab.resume_changes"] == (
        "algorithm.inner_lr: 0.01 → 0.02, trainer.max_steps: 10 → 20 at step 10")


def test_a_new_learning_rate_rescales_the_schedule_where_it_stands(tmp_path: Path) -> None:
    """With a scheduler, the checkpoint's rates (current and base) are rescaled by new/recorded: the halving every
    5 steps goes on from the new rate."""
    settings = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "debug=smoke", "resume=auto",
                "runner.backend=loop", "scheduler=step", "scheduler.step_size=5"]
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=10"]))
    last = tmp_path / "job" / "checkpoints" / "last.ckpt"
    assert torch.load(last)["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.001 * 0.5 ** 2)
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=20", "optimizer.lr=0.002"]))
    checkpoint = torch.load(last)
    assert checkpoint["global_step"] == 20
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.002 * 0.5 ** 4)
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == pytest.approx([0.002])


def test_a_change_the_checkpoint_would_undo_is_refused(tmp_path: Path) -> None:
    """Meta-SGD's ``inner_lr`` only initialises its learned rates, which the checkpoint restores."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    settings = [f"tracking.tracking_uri={store}", "algorithm=metasgd", "debug=plumbing", "resume=auto"]
    train(compose_job(tmp_path / "job", settings))
    run_id = only_run(store).info.run_id
    before = snapshot(store, run_id)
    with pytest.raises(ConfigError, match=r"algorithm.inner_lr cannot change on resume: it sets the initial value of "
                                          r"algorithm state that the checkpoint restores, so the recorded 0.01 would "
                                          r"stay in effect; drop the override or start a new run"):
        train(compose_job(tmp_path / "job", [*settings, "algorithm.inner_lr=0.05"]))
    assert snapshot(store, run_id) == before


def test_an_unreadable_checkpoint_names_the_newest_readable_one_with_finite_weights(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 10, "state_dict": {"w": torch.zeros(3)}}, folder / "epoch=0-step=10.ckpt")
    torch.save({"global_step": 30, "state_dict": {"w": torch.full((3,), float("nan"))}}, folder / "diverged.ckpt")
    (folder / "last.ckpt").write_bytes((folder / "epoch=0-step=10.ckpt").read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"checkpoint .*/last.ckpt is unreadable \(truncated or corrupt: .*\): the "
                                          r"newest readable checkpoint beside it is epoch=0-step=10.ckpt \(step 10\)"):
        check_resumable(folder / "last.ckpt", "resume=abc")
    (folder / "epoch=0-step=10.ckpt").unlink()
    with pytest.raises(ConfigError, match=r"resume=abc: checkpoint .*/last.ckpt is unreadable .*, and no other "
                                          r"checkpoint in .* is readable: start a new run"):
        check_resumable(folder / "last.ckpt", "resume=abc")


def test_a_flipped_byte_makes_a_checkpoint_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"last.ckpt is unreadable \(its member .* fails its CRC check\)"):
        check_resumable(path, "resume=abc")


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_whole_and_no_partial_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.zeros(10)}, target)

    def interrupted(checkpoint: object, file: Any, *args: object, **kwargs: object) -> None:
        file.write(b"PK\x03\x04 the first bytes of a zip archive")
        raise KeyboardInterrupt  # Ctrl-C (or a full disk) in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(10)}, target)
    assert os.listdir(target.parent) == ["last.ckpt"]
    assert read_checkpoint(target)["global_step"] == 1


KILLED_MID_WRITE = """
import os, signal, sys, torch
from metalab.checkpoints import AtomicCheckpointIO
def killed(checkpoint, file, *args, **kwargs):
    file.write(b"PK\\x03\\x04 the first bytes of a zip archive")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed
AtomicCheckpointIO().save_checkpoint({"global_step": 2}, sys.argv[1])
"""


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_checkpoint(target)["global_step"] == 1
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]  # the partial file is hidden, not a .ckpt
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, target)  # the next save clears it
    assert os.listdir(tmp_path) == ["last.ckpt"] and read_checkpoint(target)["global_step"] == 3


def test_runs_write_checkpoints_atomically(tmp_path: Path) -> None:
    trainer = make_trainer(compose_job(tmp_path, ["debug=smoke", "tracking=none"]), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_run_of_another_group_option_resumes_with_its_own_settings_not_the_defaults(tmp_path: Path) -> None:
    """``resume=<id>`` without ``task=kanji``: the recorded task is kept whole; the default option's keys
    (sinusoid's ``amplitude_min``) are not merged into it, which once failed the resume with a TypeError."""
    recorded = resolved(compose_job(tmp_path / "a", ["task=kanji", "algorithm=protonet"]), tmp_path)
    given = resolved(compose_job(tmp_path / "b", []), tmp_path)
    config, changes = merge(recorded, given, given, explicit=[])
    assert config["task"] == recorded["task"] and config["algorithm"] == recorded["algorithm"]
    assert "amplitude_min" not in config["task"] and changes == []
    changed = resolved(compose_job(tmp_path / "c", ["task=kanji", "task.ways=7"]), tmp_path)
    _, changes = merge(recorded, changed, given, explicit=[("task", "ways")])
    # A key given on the command line still counts (the model's ways follow ${task.ways}).
    assert sorted(str(change) for change in changes) == ["model.ways: 5 → 7", "task.ways: 5 → 7"]
