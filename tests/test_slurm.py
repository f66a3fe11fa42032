"""Sweeps on a real SLURM cluster: ``hardware=slurm`` submits through Hydra's submitit launcher, the jobs run
under slurmctld/slurmd, each is one MLflow run nested under the sweep's parent, and a job requeued mid-training
(``scontrol requeue``, what preemption does; or submitit, on SLURM's signal before the time limit) continues its
run from its checkpoint.

The cluster is the one at ``$METALAB_TEST_SLURM_CONF`` (its slurm.conf): .ci/run starts it with
scripts/slurm_cluster.sh. Runs go to the tracking server at ``$METALAB_TEST_SERVER_URI`` where one is set (as
in CI), else to a SQLite store in the test's folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, experiment_name, set_by_ci

pytestmark = pytest.mark.slow  # ~2 min: two sweeps (~35 s, ~90 s) whose jobs start twice; `make test-slow`

STEPS = 120  # meta-iterations of the job that is requeued: ~10 s of training here, long enough to catch it
# CPU jobs sized for the test cluster (2 CPUs, no GPUs), instead of conf/hardware/slurm.yaml's GPU defaults.
CPU_JOBS = ["hardware=slurm", "hardware.accelerator=cpu", "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]


def slurm_conf() -> str:
    """The test cluster's slurm.conf; CI must provide one (a skip there would hide a broken cluster)."""
    conf = set_by_ci("METALAB_TEST_SLURM_CONF", "the SLURM cluster", "start one with `scripts/slurm_cluster.sh "
                     "start` (as root) and set METALAB_TEST_SLURM_CONF to the slurm.conf it prints")
    assert Path(conf).is_file(), f"METALAB_TEST_SLURM_CONF={conf}: no such file"
    return conf


def slurm(conf: str, *args: str) -> str:
    return subprocess.run(args, env=os.environ | {"SLURM_CONF": conf}, capture_output=True, text=True,
                          check=True, timeout=60).stdout


@dataclass
class SlurmSweep:
    tracking_uri: str
    experiment: str
    folder: Path  # hydra.sweep.dir
    result: subprocess.CompletedProcess[str]
    requeued_job: str  # the SLURM id of the job requeued mid-training (array_task, as submitit submits an array)
    requeued_at_step: int  # the newest step checkpoint when it was requeued (0: none)

    def runs(self) -> tuple[MlflowClient, Run, list[Run]]:
        """The client, the sweep's parent run and its jobs' runs."""
        client = MlflowClient(self.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name(self.experiment).experiment_id])
        [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent") == "true"]
        return client, parent, [run for run in runs if run is not parent]


@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory: pytest.TempPathFactory) -> SlurmSweep:
    """One real SLURM sweep of two jobs: MAML (requeued once it has a step checkpoint) and ProtoNet, which fails
    on sinusoid regression at start. One sweep for both tests: a job here starts in ~15 s, CI's budget is tight."""
    conf = slurm_conf()

    def requeue_mid_training(folder: Path, process: subprocess.Popen[str]) -> tuple[str, int]:
        step = wait_for_step_checkpoint(folder / "0" / "checkpoints", process)
        [job] = [path.name for path in (folder / ".submitit").glob("*_0")]  # submitit's folder per array task
        slurm(conf, "scontrol", "requeue", job)
        release(conf, job)
        return job, step

    return run_sweep(conf, tmp_path_factory.mktemp("slurm"), [
        "hydra.launcher.timeout_min=10", "debug=smoke", "algorithm=maml,protonet", f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=100", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=10",
        "runner.backend=loop"], requeue_mid_training)


@pytest.fixture(scope="module")
def timed_out_sweep(tmp_path_factory: pytest.TempPathFactory) -> SlurmSweep:
    """One MAML job with SLURM's shortest time limit, 1 minute, and a minute of training (``trainer.max_time``,
    whose clock a resumed run carries on). slurmctld checks time limits every 30 s, so ``--signal=USR2@5`` (submitit's
    ``signal_delay_s``) reaches the job 25-55 s after it starts, mid-training here (a job starts training ~10 s
    after it starts), and at least 30 s before the limit stops it. submitit requeues it; the test lets it start again
    at once, with a 10-minute limit so that its second start finishes. No checkpoint but the one the signal leaves
    (no periodic one, one validation at the end): the run can only continue from that one."""
    conf = slurm_conf()

    def requeue_at_time_limit(folder: Path, process: subprocess.Popen[str]) -> tuple[str, int]:
        job = submitted_job(folder, process)
        release(conf, job, within_s=120, time_limit_min=10)
        return job, 0

    return run_sweep(conf, tmp_path_factory.mktemp("slurm_timeout"), [
        "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5", "hydra.launcher.max_num_timeout=3",
        "debug=smoke", "algorithm=maml", "trainer.max_steps=100000", "trainer.max_time=00:00:01:00",
        "trainer.val_check_interval=100000", "trainer.log_every_n_steps=1",
        "callbacks.checkpoint.every_n_train_steps=null", "runner.backend=loop"], requeue_at_time_limit)


def run_sweep(conf: str, root: Path, overrides: list[str],
              steer: Callable[[Path, subprocess.Popen[str]], tuple[str, int]]) -> SlurmSweep:
    """Submit a ``hardware=slurm`` sweep of CPU jobs from ``root``, tracked in an experiment of its own; while it
    runs, ``steer(hydra.sweep.dir, process)`` acts on a job and returns its id and the step of its newest step
    checkpoint then; wait for the sweep to end."""
    server = os.environ.get("METALAB_TEST_SERVER_URI", "").rstrip("/")
    uri = server or f"sqlite:///{root}/mlflow.db"
    name = experiment_name("slurm")
    folder = root / "sweep"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")} | {"SLURM_CONF": conf}
    command = [str(BIN / "metalab-train"), "-m", *CPU_JOBS, *overrides, f"tracking.tracking_uri={uri}",
               f"tracking.experiment_name={name}", f"hydra.sweep.dir={folder}"]
    process = subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        job, step = steer(folder, process)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return SlurmSweep(uri, name, folder, subprocess.CompletedProcess(command, process.returncode, stdout, stderr),
                      job, step)


def submitted_job(folder: Path, process: subprocess.Popen[str]) -> str:
    """The SLURM id of a one-job sweep's job, once submitted (submitit's folder for it)."""
    deadline = time.monotonic() + 120
    while not (jobs := [path.name for path in (folder / ".submitit").glob("*") if path.is_dir()]):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no job submitted within 120 s ({folder / '.submitit'})"
        time.sleep(0.2)
    [job] = jobs
    return job


def wait_for_step_checkpoint(folder: Path, process: subprocess.Popen[str]) -> int:
    """The step of the first periodic checkpoint the job writes (its run is then RUNNING, mid-training)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        steps = [int(m.group(1)) for path in folder.glob("*step=*.ckpt") if (m := re.search(r"step=(\d+)", path.name))]
        if steps:
            return max(steps)
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step checkpoint in {folder} within 180 s")


def release(conf: str, job: str, within_s: float = 60, time_limit_min: int | None = None) -> None:
    """SLURM holds a requeued job for ~2 minutes (its BeginTime) before it may start again; a lab waits, the test
    lets it go as soon as the job is back in the queue, held (which it must be ``within_s``), with a time limit of
    ``time_limit_min`` from then on if given."""
    deadline = time.monotonic() + within_s
    while slurm(conf, "squeue", "-h", "-j", job, "-o", "%T %r").split() != ["PENDING", "BeginTime"]:
        assert time.monotonic() < deadline, f"job {job} was not requeued (pending, held) within {within_s} s"
        time.sleep(0.5)
    limit = [f"TimeLimit={time_limit_min}"] if time_limit_min is not None else []
    slurm(conf, "scontrol", "update", f"JobId={job}", "StartTime=now", *limit)


def test_a_slurm_sweep_nests_its_jobs_under_one_parent_and_counts_the_failed_one(slurm_sweep: SlurmSweep) -> None:
    assert slurm_sweep.result.returncode == 0, slurm_sweep.result.stderr[-3000:]
    _client, parent, children = slurm_sweep.runs()
    statuses = sorted((run.data.tags["metalab.algorithm"], run.info.status) for run in children)
    assert statuses == [("maml", "FINISHED"), ("protonet", "FAILED")]  # the failed job stopped no other
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    [failed] = [run for run in children if run.info.status == "FAILED"]
    assert "learns classification tasks only" in failed.data.tags["metalab.error"]
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["sweep/jobs"], parent.data.metrics["sweep/jobs_finished"],
            parent.data.metrics["sweep/jobs_failed"]) == (2, 1, 1)
    assert "done: 2 jobs, 1 finished, 1 failed" in slurm_sweep.result.stdout
    # Each ran as its own task of the SLURM job array submitit submitted (the tag leads to the job's logs).
    [finished] = [run for run in children if run.info.status == "FINISHED"]
    array = slurm_sweep.requeued_job.split("_")[0]
    assert finished.data.tags["metalab.slurm_job_id"] == f"{array}_0"
    assert (slurm_sweep.folder / ".submitit" / f"{array}_1" / f"{array}_1_0_log.out").is_file()


def test_a_requeued_job_continues_its_run_from_its_checkpoint(slurm_sweep: SlurmSweep) -> None:
    """``scontrol requeue`` stops the job with SIGTERM and queues it again; the restarted job (``resume=auto``,
    which hardware=slurm sets) continues the same MLflow run: every step logged once, none missing."""
    client, _parent, children = slurm_sweep.runs()
    [run] = [run for run in children if run.data.tags["metalab.algorithm"] == "maml"]  # one run, not two
    assert run.info.status == "FINISHED", run.data.tags.get("metalab.error")
    assert run.data.tags["metalab.slurm_restarts"] == "1"  # the tags the restarted job wrote
    assert run.data.tags["metalab.resumed_from"].endswith("last.ckpt")
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "meta_train/loss")]
    assert sorted(steps) == list(range(STEPS))  # resumed at the step it stopped at, nothing logged twice
    log = (slurm_sweep.folder / ".submitit" / slurm_sweep.requeued_job /
           f"{slurm_sweep.requeued_job}_0_log.err").read_text()
    stopped = re.search(r"metalab: stopped: SIGTERM at step (\d+)", log)
    assert stopped and int(stopped.group(1)) >= slurm_sweep.requeued_at_step, log[-3000:]
    assert f"continue with resume={run.info.run_id}" in log


def test_a_job_past_its_time_limit_is_requeued_by_submitit_and_continues_its_run(timed_out_sweep: SlurmSweep) -> None:
    """SLURM signals the job (USR2) ahead of its time limit: it stops after the meta-iteration, saves last.ckpt,
    and only then lets submitit's handler requeue it (one timeout counted); the restarted job (``resume=auto``)
    continues the same MLflow run from that checkpoint, every step logged once, and finishes."""
    sweep = timed_out_sweep
    assert sweep.result.returncode == 0, sweep.result.stderr[-3000:]
    assert "done: 1 jobs, 1 finished, 0 failed" in sweep.result.stdout
    client, _parent, [run] = sweep.runs()  # one run, not two
    assert run.info.status == "FINISHED", run.data.tags.get("metalab.error")
    assert run.data.tags["metalab.slurm_job_id"] == sweep.requeued_job
    assert run.data.tags["metalab.slurm_restarts"] == "1"
    assert run.data.tags["metalab.resumed_from"].endswith("last.ckpt")
    logs = sweep.folder / ".submitit" / sweep.requeued_job / f"{sweep.requeued_job}_0_log"
    err, out = Path(f"{logs}.err").read_text(), Path(f"{logs}.out").read_text()
    stopped = re.search(r"metalab: stopped: SIGUSR2 at step (\d+) \(SLURM's time limit is near; submitit requeues the "
                        r"job and resume=auto goes on\): checkpoint (\S+); continue with resume=(\w+)", err)
    assert stopped, err[-3000:]
    assert stopped[2].endswith("last.ckpt") and stopped[3] == run.info.run_id
    # submitit's handler ran after the checkpoint: it requeued the job as a timeout (max_num_timeout=3: 2 left).
    assert f"Requeued job {sweep.requeued_job} (2 remaining timeouts)" in out, out[-3000:]
    steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "meta_train/loss"))
    assert 0 < int(stopped[1]) < len(steps)  # stopped mid-training, and its second start trained on
    assert steps == list(range(len(steps)))  # resumed at the step it stopped at, nothing logged twice or missing
    validations = [metric.step for metric in client.get_metric_history(run.info.run_id, "meta_val/post_loss")]
    assert validations == [steps[-1]]  # the validation after the last step, once
