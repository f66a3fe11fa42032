"""Distributed meta-training (DDP over 2 CPU processes, gloo): the same meta-gradient as one process, one run."""

from __future__ import annotations

from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from metalab.tasks import SinusoidRegression
from metalab.tasks.base import _EndlessMetaBatches
from tests.conftest import run_cli

ONE_STEP = ["debug=smoke", "optimizer=sgd", "trainer.max_steps=1", "trainer.val_check_interval=1",
            "task.meta_batch_size=4", "task.val_tasks=2", "task.test_tasks=2", "runner.backend=loop"]


def weights_after_one_step(tmp_path: Path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    result = run_cli([*ONE_STEP, f"hydra.run.dir={name}", f"tracking.tracking_uri=sqlite:///{tmp_path}/{name}.db",
                      *overrides], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


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


def test_each_process_adapts_its_own_share_of_the_same_meta_batch() -> None:
    family = SinusoidRegression(meta_batch_size=6)
    [whole] = [batch for batch, _ in zip(_EndlessMetaBatches(family, seed=3), range(1), strict=False)]
    shares = [next(iter(_EndlessMetaBatches(family, seed=3, rank=rank, world_size=3))) for rank in range(3)]
    assert [len(share) for share in shares] == [2, 2, 2]
    assert torch.equal(torch.cat([share.support_x for share in shares]), whole.support_x)
    assert torch.equal(torch.cat([share.query_y for share in shares]), whole.query_y)
