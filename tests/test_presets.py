"""The papers' protocols the presets depend on: training-only shots, Reptile's carried inner Adam state (and
the loop-only execution it needs), and the protocol settings pinned per preset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from metalab.algorithms import Context, Reptile
from metalab.errors import ConfigError
from metalab.runner import TaskRunner
from metalab.tasks import Episodes
from metalab.tasks.images import ImageClassFamily, LabelledImages

CLASSES, PER_CLASS = 6, 12


class _NumberedImages(ImageClassFamily):
    """Every split: 6 classes of 12 one-pixel images whose value is the image's index (so images can be told
    apart after sampling)."""

    name = "numbered"

    def load_split(self, split: str) -> LabelledImages:
        index = torch.arange(CLASSES * PER_CLASS)
        return LabelledImages(index.to(torch.uint8).view(-1, 1, 1, 1), index // PER_CLASS,
                              [f"class{c}" for c in range(CLASSES)])


def test_train_shots_change_only_the_training_episodes() -> None:
    family = _NumberedImages(ways=3, shots=1, queries=2, train_shots=4, meta_batch_size=2)
    generator = torch.Generator().manual_seed(0)
    expected = {"train": 4, "val": 1, "test": 1}
    for split, shots in expected.items():
        tasks = family.sample(5, generator, split)
        assert tasks.support_x.shape == (5, 3 * shots, 1, 1, 1) and tasks.query_x.shape == (5, 3 * 2, 1, 1, 1)
        for t in range(5):
            assert torch.equal(torch.bincount(tasks.support_y[t], minlength=3), torch.full((3,), shots))
            assert torch.equal(torch.bincount(tasks.query_y[t], minlength=3), torch.full((3,), 2))
            support, query = set(tasks.support_x[t].flatten().tolist()), set(tasks.query_x[t].flatten().tolist())
            assert len(support) == 3 * shots and not support & query  # distinct images, none in both sets
    assert (family.train_shots, family.shots) == (4, 1)
    assert _NumberedImages(shots=2).train_shots == 2  # unset: the evaluation shots


def test_too_many_train_shots_fail_at_start_naming_the_train_key() -> None:
    with pytest.raises(ConfigError, match=r"^task.train_shots \+ task.queries = 13 but a train class of numbered "
                                          r"has only 12 images: lower task.train_shots or task.queries$"):
        _NumberedImages(ways=3, shots=1, queries=2, train_shots=11).prepare()
    with pytest.raises(ConfigError, match=r"task.train_shots must be >= 1, got 0"):
        _NumberedImages(train_shots=0)


def scalar_tasks() -> Episodes:
    """Two tasks for a 1-weight linear model w·x with w = 0: support (x = 1, y = 1) and (x = 1, y = 0.5), so
    the MSE gradients at w = 0 are −2 and −1."""
    support_x = torch.ones(2, 1, 1, dtype=torch.double)
    support_y = torch.tensor([1.0, 0.5], dtype=torch.double).view(2, 1, 1)
    return Episodes(support_x, support_y, support_x.clone(), support_y.clone())


def scalar_reptile(carry: bool) -> Reptile:
    model = nn.Linear(1, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return Reptile(model, inner_lr=0.1, inner_steps=1, inner_optimizer="adam", carry_inner_state=carry)


def test_carried_inner_adam_state_changes_the_second_task_as_adam_prescribes() -> None:
    """One Adam step (β₁ = 0, β₂ = 0.999) from fresh state moves w by lr·sign(g); from task A's state (step 1,
    v = 0.001·2²) task B's step is lr·g / √v̂ with v = 0.999·0.004 + 0.001·1² and v̂ = v / (1 − 0.999²)."""
    training = Context(F.mse_loss, training=True)
    tasks = scalar_tasks()
    fresh = scalar_reptile(carry=False)
    fresh.task_meta_gradient(tasks[0], training)
    [fresh_b] = fresh.task_meta_gradient(tasks[1], training).gradient
    torch.testing.assert_close(fresh_b.item(), -0.1, rtol=1e-6, atol=0)  # θ − φ = −lr: Adam's first step

    carried = scalar_reptile(carry=True)
    [carried_a] = carried.task_meta_gradient(tasks[0], training).gradient
    [carried_b] = carried.task_meta_gradient(tasks[1], training).gradient
    v = 0.999 * 0.001 * 2.0**2 + 0.001 * 1.0**2
    torch.testing.assert_close(carried_a.item(), -0.1, rtol=1e-6, atol=0)  # the first task: no state yet
    torch.testing.assert_close(carried_b.item(), -0.1 / math.sqrt(v / (1 - 0.999**2)), rtol=1e-6, atol=0)  # −0.0633
    assert carried.inner_adam.step.item() == 2
    torch.testing.assert_close(carried.inner_adam.get_buffer("weight-exp_avg_sq").item(), v, rtol=1e-9, atol=0)

    before = {name: buffer.clone() for name, buffer in carried.named_buffers()}
    carried.adapt(tasks[0], Context(F.mse_loss, training=False))  # evaluation reads the state, never writes it
    assert all(torch.equal(buffer, before[name]) for name, buffer in carried.named_buffers())


def test_carried_state_runs_tasks_in_order_on_the_loop_only() -> None:
    carried = scalar_reptile(carry=True)
    for backend in ("threads", "vmap"):
        with pytest.raises(ConfigError, match=rf"^runner.backend={backend}: Reptile as configured starts each task "
                                              r"from the state the previous task left .* use runner.backend=loop"):
            TaskRunner(backend).check(carried)
    runner = TaskRunner("auto")
    runner.check(carried)
    _, loss = runner.meta_loss(carried, scalar_tasks(), Context(F.mse_loss, training=True))
    assert runner.chosen == "loop" and list(runner.probe) == ["loop"]
    assert carried.inner_adam.step.item() == 2  # no timing rounds ran extra tasks through the state
    loss.backward()
    second = -0.1 / math.sqrt((0.999 * 0.004 + 0.001) / (1 - 0.999**2))
    torch.testing.assert_close(carried.network.weight.grad.item(), (-0.1 + second) / 2, rtol=1e-6, atol=0)
    TaskRunner("threads").check(scalar_reptile(carry=False))  # without carried state, threads are fine
    with pytest.raises(ConfigError, match=r"carry_inner_state=true carries the inner Adam's moments.*=adam"):
        Reptile(nn.Linear(1, 1), inner_optimizer="sgd", carry_inner_state=True)


def test_reptile_preset_is_the_papers_omniglot_protocol(job) -> None:
    cfg = job("experiment=reptile_omniglot_5w5s", "tracking=none")
    task = cfg.task
    assert (task.shots, task.train_shots, task.queries, task.test_tasks) == (5, 10, 1, 10000)
    assert cfg.algorithm.carry_inner_state and cfg.algorithm.inner_optimizer == "adam"
    algorithm = instantiate(cfg.algorithm, model=instantiate(cfg.model))
    optimizer = torch.optim.SGD(algorithm.meta_parameters(), lr=cfg.optimizer.lr)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    for _ in range(cfg.trainer.max_steps // 4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.75)  # ε annealed linearly from 1 to 0


@pytest.mark.parametrize("name", ["protonet_omniglot_5w1s", "protonet_omniglot_5w5s", "protonet_omniglot_20w1s",
                                  "protonet_omniglot_20w5s", "protonet_miniimagenet_5w1s",
                                  "protonet_miniimagenet_5w5s"])
def test_protonet_presets_evaluate_with_running_statistics_and_halve_the_rate(job, name: str) -> None:
    cfg = job(f"experiment={name}", "tracking=none")
    assert cfg.algorithm.eval_batch_norm == "running"
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.StepLR"
    assert (cfg.scheduler.step_size, cfg.scheduler.gamma) == (2000, 0.5)


@pytest.mark.parametrize("name", ["maml_miniimagenet_5w1s", "maml_miniimagenet_5w5s", "fomaml_miniimagenet_5w1s",
                                  "fomaml_miniimagenet_5w5s", "anil_miniimagenet_5w1s", "anil_miniimagenet_5w5s"])
def test_maml_family_mini_imagenet_presets_test_with_k_queries(job, name: str) -> None:
    task = job(f"experiment={name}", "tracking=none").task
    assert task.queries == task.shots and task.train_queries == 15  # MAML's main.py: K at test, 15 in training


@pytest.mark.parametrize("name", ["anil_miniimagenet_5w1s", "anil_miniimagenet_5w5s"])
def test_anil_spread_over_runs_is_not_called_a_95_interval(job, name: str) -> None:
    spec = job(f"experiment={name}", "tracking=none").reproduction
    assert spec.published_ci95 is None
    assert "standard deviation over three random initializations" in spec.note


@pytest.mark.parametrize(("name", "task", "meta_batch", "horizon"), [("maml_trpo_nav2d", "nav2d", 20, 100),
                                                                    ("maml_trpo_cheetah_vel", "cheetah_vel", 40, 200),
                                                                    ("maml_trpo_cheetah_dir", "cheetah_dir", 40, 200)])
def test_maml_trpo_presets_are_the_papers_rl_protocol(job, name: str, task: str, meta_batch: int,
                                                      horizon: int) -> None:
    """Finn et al. 2017, §5.3 and appendix A.2: 20 rollouts a step, α = 0.1, one step, TRPO δ = 0.01, a 100-100
    policy, meta-batch 20 (navigation) or 40 (locomotion), up to 500 meta-iterations; the returns after 0…3 steps."""
    cfg = job(f"experiment={name}")
    assert cfg.task._target_.rsplit(".", 1)[-1] == {"nav2d": "Nav2D", "cheetah_vel": "CheetahVelocity",
                                                    "cheetah_dir": "CheetahDirection"}[task]
    assert (cfg.task.meta_batch_size, cfg.task.horizon) == (meta_batch, horizon)
    algorithm = cfg.algorithm
    assert algorithm._target_ == "metalab.algorithms.MAMLTRPO" and not algorithm.first_order
    assert (algorithm.inner_rollouts, algorithm.inner_lr, algorithm.inner_steps, algorithm.max_kl) == (20, 0.1, 1, 0.01)
    assert list(cfg.model.hidden_sizes) == [100, 100] and cfg.trainer.max_steps == 500
    assert cfg.learner.test_curve_steps == 3 and cfg.objective == "meta_val/post_return"
