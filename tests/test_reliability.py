"""Runs that go wrong stop early, say why in one line, and leave MLflow and the checkpoints consistent."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import Callback

from metalab.cli import main
from metalab.errors import ConfigError
from metalab.job import train
from metalab.reliability import TERMINATED_EXIT_CODE, DivergenceError, InterruptCheckpoint, Terminated, non_finite
from metalab.tracking.liveness import HEARTBEAT_TAG, HOST_TAG, PID_TAG, find_runs
from metalab.tracking.runs import RunStore
from tests.conftest import BIN, compose_job, run_cli


def test_divergence_stops_at_the_first_bad_step_and_fails_the_run(job, tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"meta_train/loss is (nan|inf) at step 0: training diverged; lower "
                                              r"optimizer.lr or algorithm.inner_lr; no checkpoint was saved before "
                                              r"it$"):
        train(job("debug=smoke", "algorithm.inner_lr=1e30", "runner.backend=loop",
                  "callbacks.checkpoint.every_n_train_steps=1"))
    assert not list(tmp_path.glob("run0/checkpoints/*.ckpt"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["metalab.error"]


def test_divergence_keeps_the_last_checkpoint_with_finite_weights_and_names_it(job, tmp_path: Path) -> None:
    """Checkpointing every step, the update that overflows the weights is not saved: the message names the
    checkpoint it left, whose weights (and optimiser state) are finite."""
    # SGD at lr 1 for three steps, then lr 3.3e38: the update of step 3 overflows float32 weights (the loss of
    # step 3, computed before it, is finite)
    overrides = ["debug=smoke", "runner.backend=loop", "callbacks.checkpoint.every_n_train_steps=1", "optimizer=sgd",
                 "optimizer.lr=1", "scheduler=step", "scheduler.step_size=3", "scheduler.gamma=3.3e38"]
    with pytest.raises(DivergenceError, match=r"^algorithm\.\S+ is not finite after the update of step 3: training "
                                              r"diverged; lower optimizer.lr or algorithm.inner_lr; the last finite "
                                              r"weights are in (\S+) \(step 3\)$") as error:
        train(job(*overrides))
    kept = Path(re.search(r"weights are in (\S+) \(step", str(error.value)).group(1))
    assert kept == tmp_path / "run0" / "checkpoints" / "last.ckpt"
    for path in kept.parent.glob("*.ckpt"):  # every checkpoint written is finite
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert non_finite(checkpoint) is None and checkpoint["global_step"] <= 3, path
    assert torch.load(kept, map_location="cpu", weights_only=False)["global_step"] == 3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["metalab.error"] == f"DivergenceError: {error.value}"


def test_divergence_from_the_command_line_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["debug=smoke", "algorithm.inner_lr=1e30"], cwd=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("metalab: error:")]
    assert len(lines) == 1 and "meta_train/loss is" in lines[0] and "lower optimizer.lr" in lines[0]
    assert "Traceback" not in result.stderr


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    result = run_cli(["debug=smoke", f"tracking.tracking_uri=http://127.0.0.1:{port}"], cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"MLflow tracking server http://127.0.0.1:{port} does not answer" in lines[0]
    assert not list(tmp_path.glob("outputs/*/*/checkpoints/*.ckpt"))  # no training happened
    assert elapsed < 60  # imports dominate; the probe itself times out in 3 s


def test_unwritable_sqlite_folder_is_refused(job) -> None:
    with pytest.raises(ConfigError, match="folder /nonexistent/folder does not exist or is not writable"):
        train(job("debug=smoke", "tracking.tracking_uri=sqlite:////nonexistent/folder/mlflow.db"))


@pytest.mark.slow  # ~60 s; resume is covered in `make test` by the SIGTERM test and tests/test_resume_safety.py
def test_killed_run_resumes_into_the_same_mlflow_run_and_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    common = ["debug=smoke", "trainer.max_steps=300", "trainer.val_check_interval=100",
              "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=10", "runner.backend=loop",
              "seed=3"]
    (tmp_path / "reference").mkdir()
    reference = run_cli([*common, f"tracking.tracking_uri=sqlite:///{tmp_path}/reference.db"],
                        cwd=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    store = f"sqlite:///{tmp_path}/mlflow.db"
    process = subprocess.Popen([str(BIN / "metalab-train"), *common, f"tracking.tracking_uri={store}"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_environment())
    deadline = time.monotonic() + 120
    while not any(int(p.stem.split("step=")[1]) >= 30 for p in tmp_path.glob("outputs/*/*/checkpoints/*step=*.ckpt")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no clean-up of any kind
    process.wait()

    client = MlflowClient(store)
    [killed] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert killed.info.status == "RUNNING"  # what a hard kill leaves behind
    resumed = run_cli([*common, f"tracking.tracking_uri={store}", f"resume={killed.info.run_id}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["metalab.resumed_from"].endswith("last.ckpt")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")]
    assert len(steps) == len(set(steps))  # no step logged twice
    ordered = sorted(steps)
    assert ordered[-1] == 299 and max(b - a for a, b in itertools.pairwise(ordered)) <= 10  # gaps < an interval
    reference_client = MlflowClient(f"sqlite:///{tmp_path}/reference.db")
    [uninterrupted] = reference_client.search_runs([reference_client.get_experiment_by_name("sinusoid").experiment_id])
    for name in ("meta_test/post_loss", "meta_test/pre_loss", "meta_val/post_loss"):
        assert run.data.metrics[name] == pytest.approx(uninterrupted.data.metrics[name], rel=1e-6), name


def test_requeued_job_continues_the_run_it_began_in_its_output_folder(tmp_path: Path) -> None:
    """``resume=auto`` (hardware=slurm sets it): a job restarted in its own output folder, as submitit requeues
    it, continues the MLflow run begun there; a job in a fresh folder starts a new run."""
    settings = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "debug=smoke", "resume=auto",
                "trainer.val_check_interval=5", "runner.backend=loop", "trainer.log_every_n_steps=1"]
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=10"]))
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=20"]))  # the requeued job goes on
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sinusoid").experiment_id
    [run] = client.search_runs([experiment])
    assert run.info.status == "FINISHED" and run.data.tags["metalab.resumed_from"].endswith("last.ckpt")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")]
    assert sorted(steps) == list(range(20))  # the second part continued at step 10, nothing logged twice
    train(compose_job(tmp_path / "fresh", [*settings, "trainer.max_steps=5"]))
    assert len(client.search_runs([experiment])) == 2


def test_resume_of_an_unknown_run_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["debug=smoke", "resume=0123456789abcdef0123456789abcdef"], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert result.returncode == 1 and len(lines) == 1
    assert "resume=0123456789abcdef0123456789abcdef: no MLflow run with that id" in lines[0]


def clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}


def test_ctrl_c_saves_a_checkpoint_and_marks_the_run_killed(tmp_path: Path) -> None:
    process = subprocess.Popen([str(BIN / "metalab-train"), "debug=smoke", "trainer.max_steps=100000",
                                "callbacks.checkpoint.every_n_train_steps=10", "runner.backend=loop"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_environment())
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("outputs/*/*/checkpoints/*step=*.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "KILLED"
    assert Path(run.data.tags["metalab.checkpoint_dir"], "interrupted.ckpt").is_file()
    assert "Traceback" not in stderr
    assert "metalab: Ctrl-C: stopping after this batch" in stderr  # held to the batch's end, not lost


def test_a_first_ctrl_c_is_held_to_the_batchs_end_and_a_second_stops_at_once(tmp_path: Path) -> None:
    """KeyboardInterrupt raised inside a finaliser is lost: the first Ctrl-C only marks, the batch end raises."""
    before = signal.getsignal(signal.SIGINT)
    callback = InterruptCheckpoint(tmp_path)
    callback.setup(None, None, "fit")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler ran (it raises nothing)
        with pytest.raises(KeyboardInterrupt):
            callback.on_train_batch_end(None)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        callback.on_exception(None, None, RuntimeError("the run failed"))  # Lightning calls no teardown then
    assert signal.getsignal(signal.SIGINT) is before


def start_training(tmp_path: Path, *overrides: str) -> subprocess.Popen[str]:
    """A real `metalab-train` on the sinusoid, tracked in tmp_path/mlflow.db, stderr captured."""
    return subprocess.Popen([str(BIN / "metalab-train"), *overrides,
                             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_environment())


def wait_for_checkpoint(process: subprocess.Popen[str], folder: Path, step: int) -> None:
    deadline = time.monotonic() + 180
    while not any(int(p.stem.split("step=")[1]) >= step for p in folder.glob("outputs/*/*/checkpoints/*step=*.ckpt")):
        assert process.poll() is None, "the run ended before the signal"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_saves_the_step_marks_the_run_killed_exits_143_and_resume_finishes_it(tmp_path: Path) -> None:
    """What SLURM sends on preemption: the run stops after the meta-iteration, in one line, with a checkpoint
    of that step that resume= continues from; the resumed run finishes with no stale error and every step once."""
    common = ["debug=smoke", "trainer.max_steps=120", "trainer.val_check_interval=60", "trainer.log_every_n_steps=1",
              "callbacks.checkpoint.every_n_train_steps=10", "runner.backend=loop"]
    process = start_training(tmp_path, *common)
    wait_for_checkpoint(process, tmp_path, 20)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == TERMINATED_EXIT_CODE == 143
    [line] = [line for line in stderr.splitlines() if line.strip()]
    stop = re.fullmatch(r"metalab: stopped: SIGTERM at step (\d+) \(preemption, scancel or kill\): checkpoint (\S+); "
                        r"continue with resume=(\w+)", line)
    assert stop, line
    step, checkpoint, run_id = int(stop[1]), Path(stop[2]), stop[3]
    assert checkpoint.name == "last.ckpt" and step >= 20
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == step

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["metalab.error"] == f"Terminated: {line.removeprefix('metalab: stopped: ')}"
    assert sorted(m.step for m in client.get_metric_history(run_id, "meta_train/loss")) == list(range(step))

    resumed = run_cli([*common, f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"resume={run_id}"],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "metalab.error" not in run.data.tags
    assert run.data.tags["metalab.resumed_from"] == str(checkpoint)
    assert sorted(m.step for m in client.get_metric_history(run_id, "meta_train/loss")) == list(range(120))
    assert sorted(m.step for m in client.get_metric_history(run_id, "meta_val/post_loss")) == [59, 119]


class SigtermInValidation(Callback):
    """Sends this process a real SIGTERM in the middle of the validation after meta-iteration ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not self.sent:
            os.kill(os.getpid(), signal.SIGTERM)  # after the first of its 4 batches
            self.sent = True


def test_sigterm_during_validation_finishes_it_then_stops_and_resumes_as_if_uninterrupted(tmp_path: Path) -> None:
    """Lightning would stop a validation after its current batch and, resumed, not redo it: that step's meta_val
    would be missing. The validation is finished first; the resumed run matches an uninterrupted one."""
    common = ["debug=smoke", "trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.log_every_n_steps=1",
              "task.eval_batch_size=3", "runner.backend=loop", "seed=3"]  # 10 validation tasks: 4 batches
    train(compose_job(tmp_path / "reference", [*common, f"tracking.tracking_uri=sqlite:///{tmp_path}/reference.db"]))
    store = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    with pytest.raises(Terminated, match=r"^SIGTERM at step 20 \(preemption, scancel or kill\): checkpoint "
                                         rf"{re.escape(str(tmp_path / 'job' / 'checkpoints' / 'last.ckpt'))}; "):
        train(compose_job(tmp_path / "job", [*common, *store, "+callbacks.sigterm._target_=tests.test_reliability."
                                             "SigtermInValidation", "+callbacks.sigterm.step=20"]))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "KILLED"
    train(compose_job(tmp_path / "job", [*common, *store, f"resume={run.info.run_id}"]))
    reference = MlflowClient(f"sqlite:///{tmp_path}/reference.db")
    [uninterrupted] = reference.search_runs([reference.get_experiment_by_name("sinusoid").experiment_id])
    for name in ("meta_train/loss", "meta_val/post_loss", "meta_val/pre_loss"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        expected = {m.step: m.value for m in reference.get_metric_history(uninterrupted.info.run_id, name)}
        assert history == pytest.approx(expected, rel=1e-6), name
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [path.name for path in (tmp_path / "job" / "checkpoints").glob("last*.ckpt")] == ["last.ckpt"]  # no -v1


class SignalAt(Callback):
    """Sends this process a real ``signum`` (a number) at the end of meta-iteration ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_submitits_time_limit_signal_is_held_until_last_ckpt_is_saved(tmp_path: Path) -> None:
    """A hardware=slurm job gets USR2 ahead of its time limit, and submitit's handler (a stand-in here) requeues the
    job and exits wherever training is. It runs only after training stopped at the meta-iteration's end and saved
    last.ckpt of that step, which the requeued job (resume=auto) continues from; the run is KILLED meanwhile."""
    checkpoint = tmp_path / "job" / "checkpoints" / "last.ckpt"
    seen: list[int] = []

    def submitit_handler(signum: int, frame: object) -> None:  # submitit's: scontrol requeue, then sys.exit(-1)
        seen.append(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])
        raise SystemExit(-1)

    store = f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            train(compose_job(tmp_path / "job", [
                "debug=smoke", "trainer.max_steps=40", "trainer.log_every_n_steps=1", "runner.backend=loop", store,
                "+callbacks.usr2._target_=tests.test_reliability.SignalAt", "+callbacks.usr2.step=13",
                f"+callbacks.usr2.signum={int(signal.SIGUSR2)}"]))
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # its own again once training stopped
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stopped.value.code == -1  # submitit's exit, after it requeued the job
    assert seen == [13]  # last.ckpt held the signal's step when the handler ran: nothing trained was lost
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["metalab.error"] == (
        "Terminated: SIGUSR2 at step 13 (SLURM's time limit is near; submitit requeues the job and resume=auto goes "
        f"on): checkpoint {checkpoint}; continue with resume={run.info.run_id}")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")) == list(range(13))


def test_runs_stale_lists_a_killed_run_not_a_live_one_and_marks_it_killed(tmp_path: Path, capsys) -> None:
    """SIGKILL leaves a run RUNNING; `metalab runs --stale` finds it (its process on this host is gone), and
    `--mark-killed` closes it; a run whose process is still there is neither listed nor touched."""
    long_run = ["debug=smoke", "trainer.max_steps=100000", "runner.backend=loop"]
    doomed, live = start_training(tmp_path, *long_run), start_training(tmp_path, *long_run, "seed=1")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        deadline = time.monotonic() + 180
        pids: dict[str, str] = {}
        while not {str(doomed.pid), str(live.pid)} <= pids.keys():  # both training: their runs name host and pid
            for process in (doomed, live):
                assert process.poll() is None, process.communicate()[1]  # its error line, if it failed
            assert time.monotonic() < deadline
            time.sleep(0.2)
            experiment = client.get_experiment_by_name("sinusoid")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            pids = {run.data.tags.get("metalab.pid"): run.info.run_id for run in runs}
        live.send_signal(signal.SIGSTOP)  # still there, no longer taking the CPU the checks need
        doomed.kill()
        doomed.wait()

        def metalab(*args: str) -> list[str]:  # the verb in this process: its start-up would dominate the test
            main(["runs", *args, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
            return capsys.readouterr().out.splitlines()

        [line] = metalab("--stale")
        assert line == (f"{pids[str(doomed.pid)]}  sinusoid/{client.get_run(pids[str(doomed.pid)]).info.run_name}  "
                        f"stale: process {doomed.pid} on {socket.gethostname()} is gone")
        assert f"{pids[str(live.pid)]}  sinusoid/{client.get_run(pids[str(live.pid)]).info.run_name}  live: process " \
               f"{live.pid} on {socket.gethostname()} is running" in metalab()  # without --stale: every RUNNING run

        assert metalab("--stale", "--mark-killed")[-1].startswith("marked 1 stale run KILLED")
        killed = client.get_run(pids[str(doomed.pid)])
        assert killed.info.status == "KILLED" and killed.data.tags["metalab.error"].startswith("stale: process")
        assert client.get_run(pids[str(live.pid)]).info.status == "RUNNING"
        assert metalab("--stale") == [f"no stale runs in sqlite:///{tmp_path}/mlflow.db"]
    finally:
        for process in (doomed, live):
            if process.poll() is None:
                process.kill()
            process.communicate()


def test_a_run_elsewhere_is_stale_once_its_heartbeat_is_older_than_the_threshold(tmp_path: Path) -> None:
    """Another host's process cannot be asked: its heartbeat's age decides (a run without one: its start)."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("elsewhere")
    beats = {"quiet": timedelta(minutes=30), "recent": timedelta(minutes=1)}
    ids = {}
    for name, age in beats.items():
        ids[name] = client.create_run(experiment, run_name=name, tags={
            HOST_TAG: "node-that-is-not-here", PID_TAG: "1",
            HEARTBEAT_TAG: (datetime.now(UTC) - age).isoformat(timespec="seconds")}).info.run_id
    runs = {run.name: run for run in find_runs(RunStore(f"sqlite:///{tmp_path}/mlflow.db"), ["elsewhere"])}
    assert runs["quiet"].stale and runs["quiet"].reason == "last heartbeat 30 min ago (host node-that-is-not-here)"
    assert not runs["recent"].stale
    assert not any(run.stale for run in find_runs(RunStore(f"sqlite:///{tmp_path}/mlflow.db"), ["elsewhere"],
                                                   stale_after=timedelta(hours=1)))
    with pytest.raises(ConfigError, match="no experiment named nowhere"):
        find_runs(RunStore(f"sqlite:///{tmp_path}/mlflow.db"), ["nowhere"])


@pytest.mark.slow  # ~90 s on 2 cores: run by `make test-slow` (.ci/run runs it after `make test`)
def test_eight_parallel_jobs_on_the_embedded_store_all_record_every_metric(tmp_path: Path) -> None:
    result = run_cli(["-m", "debug=smoke", "seed=0,1,2,3,4,5,6,7", "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=8", "trainer.log_every_n_steps=1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    jobs = [run for run in runs if run.data.tags.get("metalab.sweep_parent") != "true"]
    assert len(jobs) == 8 and {run.info.status for run in jobs} == {"FINISHED"}
    assert sorted(run.data.params["seed"] for run in jobs) == [str(seed) for seed in range(8)]
    for run in jobs:  # every step of every job made it to SQLite
        assert [m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")] == list(range(20))
        assert {"meta_val/post_loss", "meta_test/post_loss", "meta_test/post_loss_ci95"} <= set(run.data.metrics)
