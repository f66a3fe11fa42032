"""Meta-RL (Finn et al. 2017, §5.3): environment tasks, MAML-TRPO's inner policy gradient and TRPO step, a real run."""

from __future__ import annotations

import math
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call

from metalab.algorithms import MAMLTRPO
from metalab.algorithms.policy_gradient import advantages, repeated, sample_rollouts
from metalab.cli import main
from metalab.compare import compare
from metalab.config import config_dir
from metalab.errors import DATA_MISSING_EXIT_CODE, ConfigError, SimulatorMissingError
from metalab.figures import VALIDATION_CURVE, validation_curve
from metalab.job import build, train
from metalab.models import GaussianMLPPolicy
from metalab.reliability import Terminated
from metalab.tasks import CheetahDirection, CheetahVelocity, Nav2D, Pendulum
from metalab.tasks.cheetah import half_cheetah
from metalab.tasks.environments import Environment, EnvironmentTasks
from tests.conftest import compose_job, run_cli


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Policies this small gain nothing from intra-op threads, and on a loaded 2-core machine two threads wait on
    each other (a TRPO step measured ~60x slower): the tests run on one and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class OneStep(Environment):
    """1-step episodes: the observation s is fixed by the episode's seed, the reward −(a − 2s − p)² for the task's p."""

    horizon: int = 1
    observation_size: int = 1
    action_size: int = 1

    def vector(self, parameters: Tensor, seeds: Sequence[int]) -> _OneStepVector:
        return _OneStepVector(parameters[:, 0], torch.tensor([seed % 1000 / 500 - 1 for seed in seeds]))


class _OneStepVector:
    def __init__(self, targets: Tensor, observations: Tensor) -> None:
        self.targets, self.observations = targets, observations.float()

    def reset(self) -> Tensor:
        return self.observations.unsqueeze(1)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor]:
        return self.observations.unsqueeze(1), -(actions[:, 0] - 2 * self.observations - self.targets) ** 2


def test_inner_step_is_the_hand_computed_reinforce_gradient_with_a_quadratic_baseline() -> None:
    """A linear Gaussian policy on 1-step episodes: the baseline [s, s², 1]'s least squares is a quadratic fit of the
    rewards (np.polyfit), advantages are normalised per task, and ∇ log N(a; ws + c, σ²) is written out by hand."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(1, 1, hidden_sizes=(), init_log_std=-0.5)
    algorithm = MAMLTRPO(policy, inner_lr=0.1, inner_rollouts=8)
    tasks = EnvironmentTasks(torch.tensor([[0.3], [-0.7]]), torch.tensor([11, 12]), OneStep())
    parameters = repeated(policy, 2)
    rollouts = algorithm.rollouts(tasks, parameters, draw=0)
    adapted = algorithm.inner_step(parameters, rollouts, create_graph=False)

    w, c, log_std = policy.head.weight.item(), policy.head.bias.item(), policy.log_std.item()
    for task in range(2):
        s, a, r = (x[task].flatten().double().numpy()
                   for x in (rollouts.observations, rollouts.actions, rollouts.rewards))
        np.testing.assert_allclose(r, -(a - 2 * s - tasks.parameters[task, 0].item()) ** 2, rtol=1e-5)
        advantage = r - np.polyval(np.polyfit(s, r, 2), s)
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        mean, variance = w * s + c, math.exp(2 * log_std)
        gradient = {"head.weight": np.mean((a - mean) / variance * s * advantage),  # E[∇ log π · A]
                    "head.bias": np.mean((a - mean) / variance * advantage),
                    "log_std": np.mean(((a - mean) ** 2 / variance - 1) * advantage)}
        start = {"head.weight": w, "head.bias": c, "log_std": log_std}
        for name, value in gradient.items():  # ascent on the return: θ' = θ + α ∇J
            assert adapted[name][task].item() == pytest.approx(start[name] + 0.1 * value, abs=1e-5), name
        assert abs(gradient["head.weight"]) > 1e-3  # the check is not vacuous


def independent_distributions(policy: GaussianMLPPolicy, parameters: dict[str, Tensor],
                              observations: Tensor) -> Normal:
    """Task by task with functional_call (no vmap): the policies' Normal over the observations (T, K, H, O)."""
    means, stds = [], []
    for task in range(len(observations)):
        own = {name: value[task].detach() for name, value in parameters.items()}
        mean, log_std = functional_call(policy, own, (observations[task],))
        means.append(mean)
        stds.append(log_std.exp())
    return Normal(torch.stack(means), torch.stack(stds))


def test_trpo_step_stays_within_max_kl_and_improves_the_surrogate(one_thread: None) -> None:
    torch.manual_seed(0)
    family = Nav2D(meta_batch_size=3)
    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(16,))
    algorithm = MAMLTRPO(policy, inner_rollouts=5, max_kl=0.01)
    tasks = family.sample(3, torch.Generator().manual_seed(0), "train")
    pre = algorithm.rollouts(tasks, repeated(policy, 3), draw=0)
    post = algorithm.rollouts(tasks, algorithm.adapted([pre], create_graph=False), draw=1)
    advantage = advantages(post, 0.99, 1.0)

    def after_adaptation() -> Normal:
        with torch.enable_grad():
            return independent_distributions(policy, algorithm.adapted([pre], create_graph=False), post.observations)

    old = after_adaptation()
    before = [p.detach().clone() for p in policy.parameters()]
    algorithm.trpo_step([pre], post)
    new = after_adaptation()
    kl = kl_divergence(old, new).sum(-1).mean().item()
    ratio = (new.log_prob(post.actions).sum(-1) - old.log_prob(post.actions).sum(-1)).exp()
    surrogate_before, surrogate_after = advantage.mean().item(), (ratio * advantage).mean().item()
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters(), strict=True)), "no step taken"
    assert 0 < kl <= 0.01 * (1 + 1e-4)
    assert surrogate_after > surrogate_before + 1e-4


def test_nav2d_rewards_minus_the_distance_clips_actions_and_runs_100_steps() -> None:
    family = Nav2D()
    assert family.horizon == 100 and family.problem == "reinforcement"
    goals = torch.tensor([[0.3, -0.4], [0.0, 0.0]])
    envs = family.environment.vector(goals, [0, 1])
    assert torch.equal(envs.reset(), torch.zeros(2, 2))
    observation, reward = envs.step(torch.tensor([[0.5, -0.05], [-3.0, 0.02]]))
    torch.testing.assert_close(observation, torch.tensor([[0.1, -0.05], [-0.1, 0.02]]))  # each axis clipped to 0.1
    torch.testing.assert_close(reward, -torch.linalg.vector_norm(observation - goals, dim=1))
    tasks = family.sample(2, torch.Generator().manual_seed(0), "train")
    assert ((tasks.parameters >= -0.5) & (tasks.parameters <= 0.5)).all()
    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(8,))
    rollouts = sample_rollouts(tasks.environment, tasks.parameters, tasks.seeds, 0,
                               lambda obs: policy(obs), episodes=3)
    assert rollouts.rewards.shape == (2, 3, 100) and (rollouts.rewards <= 0).all()
    again = family.sample(2, torch.Generator().manual_seed(0), "train")
    assert torch.equal(tasks.parameters, again.parameters) and torch.equal(tasks.seeds, again.seeds)


def test_pendulum_tasks_step_gymnasiums_equations_with_their_own_physics() -> None:
    family = Pendulum()
    tasks = family.sample(2, torch.Generator().manual_seed(0), "train")
    (g, m, l), torque = tasks.parameters[1].tolist(), 1.5  # noqa: E741
    envs = family.environment.vector(tasks.parameters, [3, 4])
    cos, sin, speed = envs.reset()[1].double().tolist()
    observation, reward = envs.step(torch.tensor([[0.0], [torque]]))
    theta = math.atan2(sin, cos)
    new_speed = speed + (3 * g / (2 * l) * math.sin(theta) + 3.0 / (m * l**2) * torque) * 0.05
    assert observation[1, 2].item() == pytest.approx(new_speed, abs=1e-5)
    assert reward[1].item() == pytest.approx(-(theta**2 + 0.1 * speed**2 + 0.001 * torque**2), abs=1e-5)
    assert 5 <= g <= 15 and 0.5 <= m <= 1.5 and 0.5 <= l <= 1.5


@pytest.mark.parametrize(("algorithm", "task", "problem"), [("maml_trpo", "sinusoid", "regression"),
                                                             ("maml", "nav2d", "reinforcement")])
def test_an_algorithm_and_a_task_of_different_problems_are_one_line(job, algorithm: str, task: str,
                                                                      problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(job(f"algorithm={algorithm}", f"task={task}", "tracking=none"), seed=0)
    message = str(error.value)
    assert "\n" not in message and f"algorithm={algorithm}" in message and f"task={task} is {problem}" in message


def test_a_network_that_is_not_a_policy_is_refused_with_the_model_to_use(job) -> None:
    with pytest.raises(ConfigError, match=r"is not a policy for task nav2d .* use model=gaussian_mlp"):
        build(job("algorithm=maml_trpo", "task=nav2d", "model=mlp", "tracking=none"), seed=0)


def test_a_short_maml_trpo_run_on_pendulum_adapts_and_is_recorded(job, tmp_path, one_thread: None) -> None:
    """A few meta-iterations: after one inner policy-gradient step, the test tasks' return is above the one before
    (the inner step learns), and MLflow holds the returns with their 95% CIs and the inner-step curve."""
    metrics = train(job("algorithm=maml_trpo", "task=pendulum", "trainer.max_steps=4", "trainer.val_check_interval=4",
                        "trainer.log_every_n_steps=1", "task.meta_batch_size=4", "algorithm.inner_rollouts=10",
                        "task.val_tasks=4", "task.test_tasks=8", "task.eval_batch_size=8",
                        "learner.test_curve_steps=2", "callbacks=none", "trainer.enable_checkpointing=false"))
    pre, post = metrics["meta_test/pre_return"], metrics["meta_test/post_return"]
    assert post > pre + metrics["meta_test/post_return_ci95"] / 4, metrics
    assert metrics["meta_test/post_return_step1"] == post and "meta_test/post_return_step2" in metrics
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pendulum").experiment_id])
    logged = run.data.metrics
    for name in ("pre_return", "post_return", "post_return_step1", "post_return_step2"):
        assert f"meta_test/{name}" in logged and logged[f"meta_test/{name}_ci95"] > 0, name
    assert "meta_val/post_return" in logged
    assert len(client.get_metric_history(run.info.run_id, "meta_train/post_return")) == 4
    assert math.isfinite(logged["meta_train/loss"])


RL_TASKS = ["nav2d", "pendulum", "cheetah_vel", "cheetah_dir"]


def searched(*overrides: str) -> DictConfig:
    """The config an Optuna search (hparams_search=maml_optuna) composes, its ``hydra`` node resolved."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=["hparams_search=maml_optuna", *overrides], return_hydra_config=True)


@pytest.mark.parametrize(("overrides", "objective", "direction"), [
    *[([f"task={task}", "algorithm=maml_trpo"], "meta_val/post_return", "maximize") for task in RL_TASKS],
    ([], "meta_val/post_loss", "minimize"),  # sinusoid regression: the loss, as before
    (["task=kanji", "objective=meta_val/post_acc"], "meta_val/post_acc", "maximize"),
    (["task=nav2d", "algorithm=maml_trpo", "objective=meta_val/pre_return"], "meta_val/pre_return", "maximize"),
    (["task=nav2d", "algorithm=maml_trpo", "hydra.sweeper.direction=minimize"], "meta_val/post_return", "minimize"),
])
def test_a_search_on_an_rl_task_maximises_the_post_adaptation_return(overrides: list[str], objective: str,
                                                                      direction: str) -> None:
    """RL tasks set objective=meta_val/post_return; the search's direction follows the objective's name unless
    the command line sets it."""
    cfg = searched(*overrides)
    assert (cfg.objective, cfg.hydra.sweeper.direction) == (objective, direction)


@pytest.mark.slow  # ~11 s; `make test` keeps the direction's composition test and tests/test_search.py's searches
def test_an_optuna_search_on_nav2d_ranks_trials_by_their_highest_return(tmp_path: Path) -> None:
    """A real two-trial search of two-step runs (~15 s): the sweeper maximises, the parent records the best return."""
    result = run_cli(["hparams_search=maml_optuna", "hydra.sweeper.n_trials=2", "algorithm=maml_trpo", "task=nav2d",
                      "trainer.max_steps=2", "task.meta_batch_size=2", "algorithm.inner_rollouts=2",
                      "task.val_tasks=2", "task.test_tasks=2", "model.hidden_sizes=[8]", "callbacks=none",
                      "trainer.enable_checkpointing=false"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert re.search(r"Study maml_inner_loop in \S+: maximize, 2 trials in all", result.stdout + result.stderr)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent") == "true"]
    returns = [run.data.metrics["meta_val/post_return"] for run in runs if run is not parent]
    assert len(returns) == 2 and returns[0] != returns[1]
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(max(returns))


TINY_NAV2D = ["algorithm=maml_trpo", "task=nav2d", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "trainer.log_every_n_steps=1", "task.meta_batch_size=2", "algorithm.inner_rollouts=4",
              "task.val_tasks=4", "task.test_tasks=4", "model.hidden_sizes=[16]"]


def test_compare_tables_rl_runs_by_their_return_and_marks_the_highest_best(job, tmp_path: Path, capsys,
                                                                          one_thread: None) -> None:
    """Two real nav2d runs differing in inner_lr; `metalab compare --metric meta_test/post_return` (also the default
    for RL runs) tables each one's return, and the best cell is the highest (the least negative) return."""
    for inner_lr in (0.01, 0.5):
        train(job(*TINY_NAV2D, f"algorithm.inner_lr={inner_lr}", "callbacks=none",
                  "trainer.enable_checkpointing=false"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    capsys.readouterr()  # the runs' own output
    main(["compare", "--tracking-uri", uri, "--metric", "meta_test/post_return", "--rows", "algorithm.inner_lr",
          "--out", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    client = MlflowClient(uri)
    returns = {run.data.params["algorithm.inner_lr"]: run.data.metrics["meta_test/post_return"]
               for run in client.search_runs([client.get_experiment_by_name("nav2d").experiment_id])}
    assert len(returns) == 2 and all(value < 0 for value in returns.values())  # minus distances: negative
    best = max(returns, key=returns.get)
    for inner_lr, value in returns.items():
        shown = f"{value:.4f} (n=1)"
        assert (f"| {inner_lr} | **{shown}** |" if inner_lr == best else f"| {inner_lr} | {shown} |") in printed
    assert printed.startswith("meta_test/post_return: mean ± 95% CI")
    default = compare(uri, rows="algorithm.inner_lr", out=tmp_path / "default")
    assert default.metric == "meta_test/post_return"
    assert default.table.set_index("row")["best"].to_dict() == {lr: lr == best for lr in returns}
    assert {row for row, _ in default.curves} == set(returns)  # learning_curves.png: meta_val/post_return per run


def test_an_rl_run_records_its_learning_curve_figure_with_every_validation(job, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          one_thread: None) -> None:
    """figures/validation_curve.png of a 4-step nav2d run validated at steps 2 and 4 (0-based: 1, 3): a return panel
    whose lines are the logged meta_val/post_return and pre_return, with their 95% CI bands."""
    drawn: list[Figure] = []

    def keep(history: dict[str, dict[int, float]]) -> Figure | None:
        figure = validation_curve(history)
        drawn.append(figure)
        return figure

    monkeypatch.setattr("metalab.tracking.pending.validation_curve", keep)
    train(job(*TINY_NAV2D, "trainer.max_steps=4", "callbacks=none", "trainer.enable_checkpointing=false"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("nav2d").experiment_id])
    [artifact] = client.list_artifacts(run.info.run_id, "figures")
    assert artifact.path == VALIDATION_CURVE and artifact.file_size > 5_000
    png = Path(client.download_artifacts(run.info.run_id, VALIDATION_CURVE, str(tmp_path / "downloaded")))
    assert png.read_bytes().startswith(b"\x89PNG")
    [axes] = drawn[-1].axes
    assert axes.get_ylabel() == "mean episode return"
    lines = {line.get_label(): line for line in axes.lines}
    assert list(lines) == ["after adaptation", "before adaptation"] and len(axes.collections) == 2  # CI bands
    for label, name in (("after adaptation", "post_return"), ("before adaptation", "pre_return")):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"meta_val/{name}")}
        assert sorted(logged) == [1, 3], name
        assert list(lines[label].get_xdata()) == [1, 3]
        assert list(lines[label].get_ydata()) == pytest.approx([logged[1], logged[3]], rel=1e-6), name


class SigtermAfterStep(Callback):
    """Sends this process a real SIGTERM (what SLURM's preemption sends) once meta-iteration ``step`` is done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stopped_maml_trpo_run_resumes_into_its_mlflow_run_and_matches_an_uninterrupted_one(
        tmp_path: Path, one_thread: None) -> None:
    """TRPO owns the outer step (manual optimisation): the resumed run counts every meta-iteration once, from the
    checkpoint's step, draws the same training tasks and rollouts, and ends with the uninterrupted run's metrics
    and weights."""
    common = [*TINY_NAV2D, "trainer.max_steps=6", "trainer.val_check_interval=3", "seed=5"]
    reference_uri = f"sqlite:///{tmp_path}/reference.db"
    train(compose_job(tmp_path / "reference", [*common, f"tracking.tracking_uri={reference_uri}"]))
    store = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    checkpoint = tmp_path / "job" / "checkpoints" / "last.ckpt"
    with pytest.raises(Terminated, match=rf"^SIGTERM at step 4 .*: checkpoint {re.escape(str(checkpoint))}; "):
        train(compose_job(tmp_path / "job", [*common, *store, "+callbacks.sigterm._target_=tests.test_meta_rl."
                                             "SigtermAfterStep", "+callbacks.sigterm.step=4"]))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("nav2d").experiment_id])
    assert run.info.status == "KILLED"
    stopped = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert stopped["global_step"] == 4
    # TRPO's line search writes the step; the optimiser only counts it (every .grad None): it holds no state, so the
    # weights and the step are all a resume needs.
    [optimizer_state] = stopped["optimizer_states"]
    assert optimizer_state["state"] == {}
    train(compose_job(tmp_path / "job", [*common, *store, f"resume={run.info.run_id}"]))

    reference = MlflowClient(reference_uri)
    [uninterrupted] = reference.search_runs([reference.get_experiment_by_name("nav2d").experiment_id])
    for name in ("meta_train/loss", "meta_train/post_return", "meta_val/post_return", "meta_val/pre_return",
                 "meta_test/post_return", "meta_test/pre_return"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        expected = sorted((m.step, m.value) for m in reference.get_metric_history(uninterrupted.info.run_id, name))
        assert [step for step, _ in history] == [step for step, _ in expected], name  # each step once
        assert [value for _, value in history] == pytest.approx([value for _, value in expected], rel=1e-6), name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "meta_train/loss")] == list(range(6))
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    [reference_checkpoint] = (tmp_path / "reference" / "checkpoints").glob("last.ckpt")
    expected = torch.load(reference_checkpoint, map_location="cpu", weights_only=False)
    assert final["global_step"] == expected["global_step"] == 6
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=1e-6, atol=0, msg=name)


@pytest.fixture
def mujoco_checked() -> Iterator[None]:
    """MuJoCo's start-up check runs afresh in the test (it is cached once a process) and after it."""
    half_cheetah.cache_clear()
    yield
    half_cheetah.cache_clear()


@pytest.mark.parametrize("family", [CheetahVelocity, CheetahDirection])
def test_cheetah_rewards_are_the_maml_code_s_from_the_forward_velocity(family: type) -> None:
    """One step of two half-cheetahs, actions partly outside [-1, 1]: the reward is −|v − v*| − 0.05‖clip(a)‖²
    (goal velocity) or d·v − 0.05‖clip(a)‖² (direction), v the root's x displacement over dt read off MuJoCo's state."""
    tasks = family().sample(2, torch.Generator().manual_seed(0), "train")
    envs = tasks.environment.vector(tasks.parameters, [3, 4])
    envs.reset()
    actions = torch.tensor([[0.5, -2.0, 1.0, 0.3, 3.0, -0.7], [-1.5, 0.2, 0.9, -0.4, 0.1, 2.5]])
    for _ in range(5):  # get moving: the first steps from rest are slow
        before = np.array([env.unwrapped.data.qpos[0] for env in envs.envs.envs])
        _, rewards = envs.step(actions)
    after = np.array([env.unwrapped.data.qpos[0] for env in envs.envs.envs])
    velocity = (after - before) / envs.envs.envs[0].unwrapped.dt  # dt = 5 frames of 0.01 s
    control = 0.05 * (actions.clamp(-1, 1) ** 2).sum(1).numpy()
    goal = tasks.parameters[:, 0].numpy()
    expected = -np.abs(velocity - goal) - control if family is CheetahVelocity else goal * velocity - control
    np.testing.assert_allclose(rewards.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(velocity).min() > 0.05  # the check is not vacuous: the cheetahs move
    v5_reward = velocity - 0.1 * (actions.numpy() ** 2).sum(1)  # HalfCheetah-v5's own reward, not the one used
    assert np.abs(rewards.numpy() - v5_reward).min() > 1e-3


def test_cheetah_tasks_draw_their_goals_and_seed_their_episodes() -> None:
    velocities = CheetahVelocity().sample(50, torch.Generator().manual_seed(0), "train").parameters
    assert velocities.shape == (50, 1) and 0 <= velocities.min() and velocities.max() <= 2
    assert velocities.std() > 0.4  # spread over [0, 2] (a uniform's std: 0.58)
    directions = CheetahDirection().sample(50, torch.Generator().manual_seed(0), "train").parameters
    assert set(directions.flatten().tolist()) == {-1.0, 1.0}
    family = CheetahDirection(horizon=20)
    tasks = family.sample(2, torch.Generator().manual_seed(1), "train")
    again = family.sample(2, torch.Generator().manual_seed(1), "train")
    assert torch.equal(tasks.parameters, again.parameters) and torch.equal(tasks.seeds, again.seeds)
    policy = GaussianMLPPolicy(17, 6, hidden_sizes=(8,))
    first, second, other = (sample_rollouts(family.environment, tasks.parameters, tasks.seeds, draw, policy, 3)
                            for draw in (0, 0, 1))
    assert first.rewards.shape == (2, 3, 20) and first.observations.dtype == torch.float32
    assert torch.equal(first.observations, second.observations) and torch.equal(first.rewards, second.rewards)
    assert not torch.equal(first.observations[:, :, 0], other.observations[:, :, 0])  # another draw: other starts
    starts = first.observations[0, :, 0]  # (K, O): each episode its own initial state
    assert not torch.equal(starts[0], starts[1])


@pytest.mark.parametrize("family", [CheetahVelocity, CheetahDirection])
def test_without_mujoco_a_cheetah_family_is_not_built_and_says_so_in_one_line(family: type,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             mujoco_checked: None) -> None:
    monkeypatch.setitem(sys.modules, "mujoco", None)  # `import mujoco` raises ModuleNotFoundError
    tasks = family()  # built (its config is fine); preparing it, at the run's start, checks MuJoCo
    with pytest.raises(SimulatorMissingError) as error:
        tasks.prepare()
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(r"the half-cheetah tasks need MuJoCo \(Gymnasium's HalfCheetah-v5\), which cannot start "
                        r"here: ModuleNotFoundError: import of mujoco halted.*; "
                        r"install it with \.venv/bin/pip install mujoco==4\.0\.0 "
                        r"\(pinned in requirements/lock\.txt\), or choose task=nav2d or task=pendulum", message)


def test_without_mujoco_metalab_train_exits_3_with_the_line(tmp_path: Path) -> None:
    """A MuJoCo whose import fails (its shared library missing), first on the path of a real `metalab-train`."""
    (tmp_path / "broken" / "mujoco").mkdir(parents=True)
    (tmp_path / "broken" / "mujoco" / "__init__.py").write_text(
        'raise ImportError("libmujoco.so.4.0.0: cannot open shared object file")\n')
    path = os.pathsep.join([str(tmp_path / "broken"), os.environ.get("PYTHONPATH", "")])
    result = run_cli(["task=cheetah_dir", "algorithm=maml_trpo", "tracking=none"], cwd=tmp_path,
                     env={"PYTHONPATH": path})
    assert result.returncode == DATA_MISSING_EXIT_CODE == 3
    assert result.stderr.splitlines() == [
        "metalab: error: the half-cheetah tasks need MuJoCo (Gymnasium's HalfCheetah-v5), which cannot start here: "
        "ImportError: libmujoco.so.4.0.0: cannot open shared object file; install it with .venv/bin/pip install "
        "mujoco==4.0.0 (pinned in requirements/lock.txt), or choose task=nav2d or task=pendulum"]


@pytest.mark.parametrize("task", ["cheetah_vel", "cheetah_dir"])
def test_a_short_maml_trpo_run_on_a_cheetah_task_is_recorded(job, tmp_path: Path, task: str,
                                                              one_thread: None) -> None:
    metrics = train(job("algorithm=maml_trpo", f"task={task}", "trainer.max_steps=2", "task.meta_batch_size=2",
                        "algorithm.inner_rollouts=2", "task.horizon=20", "task.val_tasks=2", "task.test_tasks=2",
                        "model.hidden_sizes=[16]", "callbacks=none", "trainer.enable_checkpointing=false"))
    for name in ("pre_return", "post_return"):
        assert math.isfinite(metrics[f"meta_test/{name}"]) and metrics[f"meta_test/{name}_ci95"] > 0, name
    assert not list(tmp_path.glob("**/MUJOCO_LOG.TXT")) and not Path("MUJOCO_LOG.TXT").exists()
