"""Distributed meta-training (DDP over 2 CPU processes, gloo): the same meta-gradient as one process, one run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from metalab.algorithms import MAML, Context
from metalab.models import MLP
from metalab.runner import TaskRunner
from metalab.tasks import SinusoidRegression
from metalab.tasks.base import _EndlessMetaBatches
from tests.conftest import run_cli
from tests.test_meta_gradient import double_tasks

ONE_STEP = ["debug=smoke", "optimizer=sgd", "trainer.max_steps=1", "trainer.val_check_interval=1",
            "task.meta_batch_size=4", "task.val_tasks=2", "task.test_tasks=2", "runner.backend=loop"]


def weights_after_one_step(tmp_path: Path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    result = run_cli([*ONE_STEP, f"hydra.run.dir={name}", f"tracking.tracking_uri=sqlite:///{tmp_path}/{name}.db",
                      *overrides], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow  # ~45 s; `make test` keeps the README's ddp_cpu command below
def test_two_gloo_processes_give_the_single_process_meta_gradient_and_one_run(tmp_path: Path) -> None:
    """SGD moves the weights by -lr × meta-gradient: equal moves from equal starts mean equal meta-gradients."""
    start = weights_after_one_step(tmp_path, "start", "optimizer.lr=0.0")
    single = weights_after_one_step(tmp_path, "single", "optimizer.lr=0.5")
    distributed = weights_after_one_step(tmp_path, "ddp", "optimizer.lr=0.5", "hardware=ddp_cpu")
    assert start.keys() == single.keys() == distributed.keys()
    for key in start:
        single_step, distributed_step = single[key] - start[key], distributed[key] - start[key]
        assert single_step.abs().max() > 0, key  # the step moved every weight: the comparison means something
        torch.testing.assert_close(distributed_step, single_step, rtol=1e-5, atol=1e-7)

    client = MlflowClient(f"sqlite:///{tmp_path}/ddp.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])  # one run, not one per rank
    assert run.info.status == "FINISHED"
    assert run.data.tags["metalab.world_size"] == "2"
    assert run.data.tags["metalab.rank_seeds"] == "0:0, 1:1"  # each process seeds torch with seed + rank
    assert "meta_test/post_loss" in run.data.metrics


def test_shares_of_an_uneven_meta_batch_average_to_its_mean_meta_gradient() -> None:
    """5 tasks over 2 processes (3 + 2): DDP's average of the weighted shares' gradients is the 5 tasks' mean."""
    torch.manual_seed(0)
    model, tasks = MLP(1, (16,), 1).double(), double_tasks(5)
    context = Context(F.mse_loss, training=True)
    whole = MAML(copy.deepcopy(model), inner_lr=0.05)
    TaskRunner("loop").meta_loss(whole, tasks, context)[1].backward()
    sharded = MAML(copy.deepcopy(model), inner_lr=0.05)
    sizes = []
    for rank in range(2):
        local, weight = TaskRunner.share(tasks, rank, 2)
        sizes.append(len(local))
        (TaskRunner("loop").meta_loss(sharded, local, context)[1] * weight / 2).backward()  # / 2: DDP's average
    assert sizes == [2, 3]
    for got, expected in zip(sharded.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12)


def test_every_process_draws_the_same_meta_batch_and_the_shares_cover_it() -> None:
    family = SinusoidRegression(meta_batch_size=6)
    first = next(iter(_EndlessMetaBatches(family, seed=3)))
    again = next(iter(_EndlessMetaBatches(family, seed=3)))
    assert torch.equal(first.support_x, again.support_x)
    shares = [TaskRunner.share(first, rank, 4)[0] for rank in range(4)]
    assert [len(share) for share in shares] == [1, 2, 1, 2]
    assert torch.equal(torch.cat([share.support_x for share in shares]), first.support_x)
    assert torch.equal(torch.cat([share.query_y for share in shares]), first.query_y)


def test_the_readme_command_runs_with_the_default_meta_batch(tmp_path: Path) -> None:
    """`metalab-train hardware=ddp_cpu` as the README gives it, only shorter: 25 tasks per meta-batch over 2
    processes (13 + 12), validated after its last step."""
    result = run_cli(["hardware=ddp_cpu", "trainer.max_steps=2", "task.val_tasks=2", "task.test_tasks=4",
                      f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["metalab.world_size"] == "2"
    assert run.data.params["task.meta_batch_size"] == "25"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "meta_val/post_loss")][-1] == 1
    assert "meta_test/post_loss" in run.data.metrics
