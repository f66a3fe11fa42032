"""Every algorithm under every backend it declares computes the loop's meta-gradient; ``auto`` is timed,
survives a failing candidate, and is recorded on the run."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from metalab.algorithms import MAML, Context, MetaAlgorithm
from metalab.config import config_dir
from metalab.errors import ConfigError
from metalab.job import train
from metalab.learner import MetaLearner
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner, vectorises
from metalab.tasks import Episodes
from tests.test_meta_gradient import double_tasks

# Every option of conf/algorithm/, with two inner steps where it has inner steps: a new algorithm is tested here
# without new test code.
ALGORITHM_OPTIONS = sorted(path.stem for path in (config_dir() / "algorithm").glob("*.yaml"))
TWO_STEPS = {"inner_steps": 2}


def image_tasks(count: int = 4, ways: int = 3, shots: int = 2, queries: int = 3) -> Episodes:
    generator = torch.Generator().manual_seed(0)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(count, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(count, -1)
    return Episodes(torch.randn(count, ways * shots, 1, 16, 16, generator=generator, dtype=torch.double), support_y,
                    torch.randn(count, ways * queries, 1, 16, 16, generator=generator, dtype=torch.double), query_y)


def build_algorithm(job, option: str, model: torch.nn.Module) -> MetaAlgorithm:
    cfg = job(f"algorithm={option}", "tracking=none")
    settings = {key: value for key, value in TWO_STEPS.items() if key in cfg.algorithm}
    return instantiate(cfg.algorithm, model=model, **settings)


def meta_gradient(algorithm: MetaAlgorithm, tasks: Episodes, problem: str,
                  backend: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    learner = MetaLearner(algorithm, optimizer=torch.optim.Adam, problem=problem, runner=TaskRunner(backend))
    learner.log = lambda *args, **kwargs: None
    loss = learner.training_step(tasks, 0)
    loss.backward()
    assert learner.runner.chosen == backend
    return [p.grad for p in algorithm.parameters() if p.grad is not None], loss.detach()  # ProtoNet: no head


def cases() -> list[tuple[str, str, str]]:
    """(algorithm option, network, backend) for every backend each algorithm declares besides the loop."""
    found = []
    for option in ALGORITHM_OPTIONS:
        for network in ("mlp", "cnn_with_batchnorm"):
            found.append((option, network, "threads"))
            found.append((option, network, "vmap"))
    return found


@pytest.mark.parametrize(("option", "network", "backend"), cases())
def test_every_declared_backend_gives_the_loops_meta_gradient(job, option: str, network: str, backend: str) -> None:
    torch.manual_seed(0)
    if network == "mlp":
        model, tasks, problem = MLP(1, (32, 32), 1).double(), double_tasks(6), "regression"
    else:
        model, tasks, problem = CNN4(3, 1, image_size=16, hidden_size=8).double(), image_tasks(), "classification"
    reference = build_algorithm(job, option, copy.deepcopy(model))
    if problem not in reference.problems:
        pytest.skip(f"{option} does not learn {problem} tasks")
    if not reference.episodic:
        pytest.skip(f"{option} pre-trains on labelled examples: it has no meta-gradient (tests/test_finetune.py)")
    if backend == "threads" and not reference.thread_safe:
        with pytest.raises(ConfigError, match="tasks cannot run on threads at once"):
            TaskRunner("threads").check(reference)
        return
    if backend == "vmap" and not vectorises(reference):
        with pytest.raises(ConfigError, match="declares no vectorised_adapt"):
            TaskRunner("vmap").check(reference)
        return
    loop_gradient, loop_loss = meta_gradient(reference, tasks, problem, "loop")
    gradient, loss = meta_gradient(build_algorithm(job, option, copy.deepcopy(model)), tasks, problem, backend)
    torch.testing.assert_close(loss, loop_loss, rtol=1e-5, atol=1e-10)
    assert len(gradient) == len(loop_gradient)
    for got, expected in zip(gradient, loop_gradient, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in gradient)


def test_the_zoos_vectorised_algorithms(job) -> None:
    """Pins which algorithms opt in to vmap, so a lost ``vectorised_adapt`` is noticed."""
    declared = {option for option in ALGORITHM_OPTIONS if vectorises(build_algorithm(job, option, MLP(1, (4,), 1)))}
    assert {"maml", "fomaml", "metasgd", "anil"} <= declared
    assert not {"reptile", "protonet"} & declared


def test_batchnorm_statistics_stay_per_task() -> None:
    """Scaling one task's images must not change another task's predictions (no shared batch statistics)."""
    torch.manual_seed(0)
    algorithm = MAML(CNN4(3, channels=1, image_size=16, hidden_size=8).double(), inner_lr=0.1)
    runner, context = TaskRunner("vmap"), Context(F.cross_entropy, training=True)
    tasks = image_tasks(count=2)
    before = runner.predictions(algorithm, tasks, context)[0]
    scale = torch.tensor([1.0, 50.0], dtype=torch.double).view(2, 1, 1, 1, 1)
    scaled = Episodes(tasks.support_x * scale, tasks.support_y, tasks.query_x * scale, tasks.query_y)
    after = runner.predictions(algorithm, scaled, context)[0]
    torch.testing.assert_close(before, after)


def test_threads_backend_restores_intra_op_threads_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model, tasks = MLP(1, (32, 32), 1).double(), double_tasks(6)
    threads = torch.get_num_threads()
    first, _ = meta_gradient(MAML(copy.deepcopy(model), inner_lr=0.05), tasks, "regression", "threads")
    second, _ = meta_gradient(MAML(copy.deepcopy(model), inner_lr=0.05), tasks, "regression", "threads")
    assert torch.get_num_threads() == threads
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # summed in task order, whichever worker finished first


class _VmapFails(MAML):
    """MAML whose vectorised path raises as ``vmap`` does on data-dependent shapes (DropBlock's nonzero)."""

    def vectorised_adapt(self, support_x, support_y, context):
        raise RuntimeError("vmap: We do not support batching operators that can output dynamic shape")


def run_steps(runner: TaskRunner, algorithm: MetaAlgorithm, steps: int, tasks: Episodes | None = None) -> None:
    """``steps`` meta-iterations' meta-losses and backward passes (no outer update), as the learner runs them."""
    for _ in range(steps):
        _, loss = runner.meta_loss(algorithm, tasks or double_tasks(4), Context(F.mse_loss, training=True))
        loss.backward()


def test_auto_drops_a_backend_that_fails_on_the_probe_and_says_why() -> None:
    torch.manual_seed(0)
    runner = TaskRunner("auto")
    algorithm = _VmapFails(MLP(1, (8,), 1).double(), inner_lr=0.05)
    run_steps(runner, algorithm, 8)
    assert runner.chosen in ("loop", "threads")
    assert runner.probe["vmap"].startswith("failed: RuntimeError: vmap: We do not support batching operators")
    assert runner.probe["loop"].endswith(" ms")


class _TimedRunner(TaskRunner):
    """A runner whose backends take set extra seconds per meta-gradient; counts how often each one ran."""

    def __init__(self, delays: dict[str, float]) -> None:
        super().__init__("auto")
        self.delays, self.calls = delays, dict.fromkeys(delays, 0)

    def _meta_loss(self, backend, algorithm, episodes, context):
        self.calls[backend] += 1
        time.sleep(self.delays[backend])
        return super()._meta_loss(backend, algorithm, episodes, context)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="auto times threads only on a CPU with several threads")
def test_auto_probes_on_real_steps_timing_a_far_slower_candidate_once_and_close_ones_twice() -> None:
    runner = _TimedRunner({"loop": 0.05, "threads": 0.05, "vmap": 0.25})
    run_steps(runner, MAML(MLP(1, (8,), 1).double(), inner_lr=0.05), 10)
    # 10 steps, 10 meta-losses: the probe runs no meta-batch of its own. A warm-up step and a timed one per
    # candidate, a second timed step for the close ones (vmap, 5x slower, gets none), then the chosen one.
    assert sum(runner.calls.values()) == 10
    chosen = {name: int(name == runner.chosen) for name in runner.calls}
    assert runner.calls == {"loop": 3 + 2 * chosen["loop"], "threads": 3 + 2 * chosen["threads"], "vmap": 2}
    assert runner.chosen in ("loop", "threads")


def test_the_probe_steps_give_the_loops_meta_gradients() -> None:
    """Each probe step (vmap, threads, loop in turn) trains as the loop would: same meta-gradient, rel 1e-5."""
    torch.manual_seed(0)
    algorithm = MAML(CNN4(3, 1, image_size=16, hidden_size=8).double(), inner_lr=0.1)
    auto, loop = TaskRunner("auto"), TaskRunner("loop")
    for step in range(10):  # at most 9 probe steps: warm-up and timed for 3 candidates, 3 in the second round
        tasks = image_tasks(count=3)
        gradients = []
        for runner in (auto, loop):
            algorithm.zero_grad()
            _, loss = runner.meta_loss(algorithm, tasks, Context(F.cross_entropy, training=True))
            loss.backward()
            gradients.append([p.grad.clone() for p in algorithm.parameters()])
        for got, expected in zip(*gradients, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10, msg=f"step {step}")
    assert auto.chosen is not None and auto._seconds.keys() >= {"loop", "vmap"}


def test_a_run_shorter_than_the_probe_keeps_the_fastest_backend_measured() -> None:
    """vmap is slowed by 0.25 s a meta-gradient, so which warm-up is fastest does not hang on this machine's timing
    (with no delay, vmap's warm-up beat the loop's on a loaded machine and the test failed)."""
    runner = _TimedRunner({"loop": 0.0, "threads": 0.0, "vmap": 0.25})
    run_steps(runner, MAML(MLP(1, (8,), 1).double(), inner_lr=0.05), 2)  # warm-ups of two candidates only
    assert runner.chosen is None and sum(runner.calls.values()) == 2
    measured = {name for name, calls in runner.calls.items() if calls}
    runner.settle()
    assert runner.chosen in measured - {"vmap"} and runner.probe["loop"].endswith(" ms")


def test_auto_never_probes_vmap_for_an_algorithm_that_does_not_declare_it() -> None:
    from metalab.algorithms import Reptile

    runner = TaskRunner("auto")
    runner.meta_loss(Reptile(MLP(1, (8,), 1).double()), double_tasks(4), Context(F.mse_loss, training=True))
    assert "vmap" not in runner.probe and "loop" in runner.probe


def test_auto_backend_is_timed_and_recorded_on_the_run(job, tmp_path: Path) -> None:
    train(job("debug=smoke", "runner.backend=auto"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    probe = run.data.tags["metalab.backend_probe"]
    timings = {part.split()[0]: float(part.split()[1]) for part in probe.split(", ")}  # "loop 12.3 ms, ..."
    assert set(timings) == {"loop", "vmap"} | ({"threads"} if torch.get_num_threads() > 1 else set())
    chosen = run.data.tags["metalab.backend"]
    needed = {"loop": 1.0, "threads": 1.0, "vmap": 0.95}  # vmap must beat the loop by 5%
    qualified = {name: ms for name, ms in timings.items() if ms <= needed[name] * timings["loop"] + 0.1}
    assert chosen in qualified and timings[chosen] <= min(qualified.values()) + 0.1  # ms are printed rounded
