"""Every run validates after its last step, however short and whatever stopped it; the default interval
scales with max_steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from metalab.job import train
from metalab.tasks import SinusoidRegression
from metalab.validation import val_check_interval
from tests.conftest import compose_job

QUICK = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
         "task.val_tasks=5", "task.test_tasks=5", "runner.backend=loop"]


@pytest.mark.parametrize(("max_steps", "interval", "expected"), [
    (7, None, 2), (50, None, 10), (5000, None, 1000), (100_000, None, 1000), (0, None, 1), (-1, None, 1000),
    (50, 7, 7)])
def test_default_interval_is_a_fifth_of_max_steps_at_most_1000_and_an_explicit_one_is_kept(
        max_steps: int, interval: int | None, expected: int) -> None:
    assert val_check_interval(max_steps, interval) == expected


def steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, metric)]


def only_run(root: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    return client, run.info.run_id


def test_a_7_step_run_with_the_default_interval_validates_at_its_last_step(job, tmp_path: Path) -> None:
    cfg = job(*QUICK, "trainer.max_steps=7")
    assert cfg.trainer.val_check_interval is None  # the default: 7/5 rounded up, every 2 steps
    metrics = train(cfg)
    assert metrics["meta_val/post_loss"] == metrics["meta_val/post_loss"]  # logged, not NaN: a sweep's objective
    client, run_id = only_run(tmp_path)
    assert steps(client, run_id, "meta_val/post_loss") == [1, 3, 5, 6]  # the interval's, then the last step's
    assert steps(client, run_id, "meta_train/loss")[-1] == 6
    last = torch.load(tmp_path / "run0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 7  # saved by the final validation: the trained weights, not step 6's


def test_a_last_step_on_the_interval_validates_once(job, tmp_path: Path) -> None:
    train(job(*QUICK, "trainer.max_steps=6", "trainer.val_check_interval=3"))
    client, run_id = only_run(tmp_path)
    assert steps(client, run_id, "meta_val/post_loss") == [2, 5]


def test_a_run_stopped_by_max_time_validates_at_its_last_step(job, tmp_path: Path) -> None:
    metrics = train(job(*QUICK, "trainer.max_steps=1000000", "trainer.max_time=00:00:00:02"))
    client, run_id = only_run(tmp_path)
    last_step = steps(client, run_id, "meta_train/loss")[-1]
    assert 0 < last_step < 999_999  # time stopped it, long before max_steps
    assert steps(client, run_id, "meta_val/post_loss") == [last_step]  # the interval (1000) never came
    assert "meta_val/post_loss" in metrics


def test_a_resumed_run_validates_at_its_new_last_step(tmp_path: Path) -> None:
    settings = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *QUICK, "resume=auto"]
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=7"]))
    train(compose_job(tmp_path / "job", [*settings, "trainer.max_steps=11"]))  # continues from last.ckpt (step 7)
    client, run_id = only_run(tmp_path)
    # 7 steps every 2, then the last (6); resumed with 11 steps: every 3 (8), then the last (10). Each step is
    # logged once, where it happened, although the resumed interval does not fall on the checkpoint's step.
    assert steps(client, run_id, "meta_val/post_loss") == [1, 3, 5, 6, 8, 10]
    assert steps(client, run_id, "meta_train/loss") == list(range(11))


def evaluation_tasks(family: SinusoidRegression, split: str = "test") -> list:
    loader = family.test_dataloader() if split == "test" else family.val_dataloader()
    return [batch for batch in loader]


def test_evaluation_tasks_are_drawn_batch_by_batch_and_the_same_whatever_the_batch_size() -> None:
    family = SinusoidRegression(test_tasks=7, eval_batch_size=3)
    drawn = []
    sample = family.sample
    family.sample = lambda count, generator, split: drawn.append(count) or sample(count, generator, split)
    loader = family.test_dataloader()
    assert drawn == []  # nothing drawn before a batch is asked for
    first = next(iter(loader))
    assert len(first) == 3 and sum(drawn) == 3  # one batch in memory, not the 7 tasks
    batches = evaluation_tasks(family)
    assert [len(batch) for batch in batches] == [3, 3, 1]
    whole = evaluation_tasks(SinusoidRegression(test_tasks=7, eval_batch_size=7))[0]
    for name in ("support_x", "support_y", "query_x", "query_y"):  # the same tasks, whatever the batch size
        assert torch.equal(torch.cat([getattr(batch, name) for batch in batches]), getattr(whole, name))
    again = evaluation_tasks(family)  # and the same at every validation of a run, and in every run
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(whole.query_y, evaluation_tasks(SinusoidRegression(test_tasks=7, eval_batch_size=7,
                                                                              eval_seed=2))[0].query_y)
    validation = evaluation_tasks(SinusoidRegression(val_tasks=7, eval_batch_size=7), "val")[0]
    assert not torch.equal(validation.query_y, whole.query_y)  # validation and test tasks differ
