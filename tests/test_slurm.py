"""Sweeps on a real SLURM cluster: ``hardware=slurm`` submits through Hydra's submitit launcher, the jobs run
under slurmctld/slurmd, each is one MLflow run nested under the sweep's parent, and a job requeued mid-training
(``scontrol requeue``, what preemption does) continues its run from its checkpoint.

The cluster is the one at ``$METALAB_TEST_SLURM_CONF`` (its slurm.conf): .ci/run starts it with
scripts/slurm_cluster.sh. Runs go to the tracking server at ``$METALAB_TEST_SERVER_URI`` where one is set (as
in CI), else to a SQLite store in the test's folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, experiment_name

pytestmark = pytest.mark.slow  # ~75 s: one sweep whose job starts twice; .ci/run runs it in `make test-slow`

STEPS = 120  # meta-iterations of the job that is requeued: ~10 s of training here, long enough to catch it
# CPU jobs sized for the test cluster (2 CPUs, no GPUs), instead of conf/hardware/slurm.yaml's GPU defaults.
CPU_JOBS = ["hardware=slurm", "hardware.accelerator=cpu", "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


def slurm_conf() -> str:
    """The test cluster's slurm.conf; CI must provide one (a skip there would hide a broken cluster)."""
    conf = os.environ.get("METALAB_TEST_SLURM_CONF", "")
    if not conf:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but METALAB_TEST_SLURM_CONF is unset: .ci/run starts the cluster "
                        "(scripts/slurm_cluster.sh) and exports it")
        pytest.skip("no SLURM cluster: start one with `scripts/slurm_cluster.sh start` (as root) and set "
                    "METALAB_TEST_SLURM_CONF to the slurm.conf it prints")
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
    requeued_job: str  # the SLURM id of the job requeued mid-training (array_task, as submitit submits)
    requeued_at_step: int  # the newest step checkpoint when it was requeued

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
    root = tmp_path_factory.mktemp("slurm")
    server = os.environ.get("METALAB_TEST_SERVER_URI", "").rstrip("/")
    uri = server or f"sqlite:///{root}/mlflow.db"
    name = experiment_name("slurm")
    folder = root / "sweep"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")} | {"SLURM_CONF": conf}
    command = [str(BIN / "metalab-train"), "-m", *CPU_JOBS, "debug=smoke", "algorithm=maml,protonet",
               f"trainer.max_steps={STEPS}", "trainer.val_check_interval=100", "trainer.log_every_n_steps=1",
               "callbacks.checkpoint.every_n_train_steps=10", "runner.backend=loop",
               f"tracking.tracking_uri={uri}", f"tracking.experiment_name={name}", f"hydra.sweep.dir={folder}"]
    process = subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        step = wait_for_step_checkpoint(folder / "0" / "checkpoints", process)
        [job] = [path.name for path in (folder / ".submitit").glob("*_0")]  # submitit's folder per array task
        slurm(conf, "scontrol", "requeue", job)
        release(conf, job)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return SlurmSweep(uri, name, folder, subprocess.CompletedProcess(command, process.returncode, stdout, stderr),
                      job, step)


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


def release(conf: str, job: str) -> None:
    """SLURM holds a requeued job for ~2 minutes (its BeginTime) before it may start again; a lab waits, the test
    lets it go as soon as the job is back in the queue."""
    deadline = time.monotonic() + 60
    while slurm(conf, "squeue", "-h", "-j", job, "-o", "%T").strip() != "PENDING":
        assert time.monotonic() < deadline, f"job {job} was not pending again within 60 s of its requeue"
        time.sleep(0.5)
    slurm(conf, "scontrol", "update", f"JobId={job}", "StartTime=now")


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
