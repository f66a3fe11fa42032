"""docs/architecture.md's recipes hold: an algorithm written in this file runs through every backend it
declares, and through `metalab-train` after adding only its YAML; an algorithm may own its outer step."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import learn2learn as l2l
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms import Context, MetaAlgorithm
from metalab.algorithms.functional import task_local_modules, vectorised_sgd
from metalab.config import config_dir
from metalab.errors import ConfigError
from metalab.learner import MetaLearner
from metalab.models import CNN4, MLP
from metalab.runner import TaskRunner
from metalab.tasks import SinusoidRegression
from tests.test_meta_gradient import double_tasks

REPOSITORY = Path(__file__).resolve().parents[1]


class OneStepSGD(MetaAlgorithm):
    """MAML with one inner SGD step, written from scratch with ``torch.func`` (the recipe's example)."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.05) -> None:
        super().__init__()
        self.network, self.inner_lr = model, inner_lr

    @property
    def model(self) -> nn.Module:
        return self.network

    def adapt(self, task, context: Context):
        # functional_call swaps a module's tensors while it runs: each task (maybe on a worker thread) gets
        # its own module objects over the shared tensors
        network = task_local_modules(self.network)
        weights = dict(network.named_parameters())
        loss = context.loss_fn(functional_call(network, weights, (task.support_x,)), task.support_y)
        gradients = torch.autograd.grad(loss, list(weights.values()), create_graph=context.training)
        fast = {name: w - self.inner_lr * g for (name, w), g in zip(weights.items(), gradients, strict=True)}
        return lambda x: functional_call(network, fast, (x,))

    def vectorised_adapt(self, support_x: Tensor, support_y: Tensor, context: Context):
        rates = {name: self.inner_lr for name, _ in self.network.named_parameters()}
        return vectorised_sgd(self.network, rates, support_x, support_y, context.loss_fn, 1, not context.training)


def test_an_algorithm_written_here_gives_one_meta_gradient_under_every_backend_it_declares() -> None:
    torch.manual_seed(0)
    model, tasks = MLP(1, (16, 16), 1).double(), double_tasks(16)  # enough tasks for threads to overlap
    gradients = {}
    for backend in ("loop", "threads", "vmap"):
        algorithm = OneStepSGD(copy.deepcopy(model))
        _, loss = TaskRunner(backend).meta_loss(algorithm, tasks, Context(F.mse_loss, training=True))
        loss.backward()
        gradients[backend] = [p.grad for p in algorithm.parameters()]
    for backend in ("threads", "vmap"):
        for got, expected in zip(gradients[backend], gradients["loop"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in gradients["loop"])


def test_adding_an_algorithm_needs_only_its_module_and_its_yaml(tmp_path: Path) -> None:
    """The module is this file; the YAML goes into a copy of the config tree; `metalab-train` runs it."""
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    (conf / "algorithm" / "one_step_sgd.yaml").write_text(
        "defaults:\n  - one_step_sgd_schema\n  - _self_\n\n_target_: tests.test_architecture.OneStepSGD\n"
        "inner_lr: 0.05\n")
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "HYDRA_"))}
    environment |= {"METALAB_CONFIG_DIR": str(conf), "METALAB_EXPERIMENTS_DIR": str(tmp_path / "none"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "metalab.train", "algorithm=one_step_sgd", "debug=smoke",
                             "runner.backend=vmap", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("sinusoid").experiment_id])
    assert run.data.tags["metalab.algorithm"] == "one_step_sgd"
    assert run.data.tags["metalab.backend"] == "vmap"
    assert run.data.params["algorithm.inner_lr"] == "0.05"
    assert run.data.metrics["meta_test/post_loss"] > 0


class SignSGDOuterStep(OneStepSGD):
    """Owns its outer step: the sign of the mean meta-gradient, computed task by task here, through the optimiser."""

    owns_outer_step = True

    def outer_step(self, episodes, context: Context, optimizer) -> tuple[Tensor, Tensor]:
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        outcomes = [self.task_meta_gradient(task, context) for task in episodes]
        optimizer.zero_grad()
        for index, parameter in enumerate(self.meta_parameters()):
            parameter.grad = torch.stack([o.gradient[index] for o in outcomes]).mean(0).sign()
        optimizer.step()
        return torch.stack([o.prediction for o in outcomes]), torch.stack([o.loss for o in outcomes]).mean()


def test_an_algorithm_that_owns_its_outer_step_takes_it_instead_of_the_runner() -> None:
    torch.manual_seed(0)
    algorithm = SignSGDOuterStep(MLP(1, (8,), 1))
    before = [p.detach().clone() for p in algorithm.parameters()]
    learner = MetaLearner(algorithm, optimizer=lambda p: torch.optim.SGD(p, lr=0.01), problem="regression",
                          runner=TaskRunner("loop"))
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         inference_mode=False, check_val_every_n_epoch=None, accelerator="cpu", devices=1)
    trainer.fit(learner, datamodule=SinusoidRegression(meta_batch_size=4))
    assert algorithm.steps_taken == 3 and learner.runner.chosen == "loop" and not learner.runner.probe
    steps = torch.cat([((now.detach() - start) / 0.01).flatten() for start, now in
                       zip(before, algorithm.parameters(), strict=True)])
    # sign steps of lr 0.01 (a mean gradient's sign is ±1 where it is not 0): whole multiples, at most three
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    assert steps.abs().max() <= 3 + 1e-3 and (steps.abs() > 2.5).any()


@pytest.mark.parametrize(("layers", "image_size"), [(1, 28), (2, 16), (3, 28), (4, 28), (4, 84)])
def test_cnn4_of_any_depth_sizes_its_head_for_learn2learns_pooling(layers: int, image_size: int) -> None:
    """learn2learn's blocks max-pool by 2·(4 // layers): the head must take what the blocks leave."""
    model = CNN4(5, channels=1, image_size=image_size, hidden_size=8, layers=layers)
    assert model(torch.randn(2, 1, image_size, image_size)).shape == (2, 5)


def test_cnn4_refuses_a_depth_or_image_learn2learns_blocks_cannot_pool() -> None:
    with pytest.raises(ConfigError, match=r"^model.layers must be 1 to 4 .*got 5$"):
        CNN4(5, layers=5)
    with pytest.raises(ConfigError, match=r"image_size >= 16 for layers=2, got .*image_size=8$"):
        CNN4(5, image_size=8, layers=2)


def _with_learn2learns_relu_and_max_pool(model: CNN4) -> CNN4:
    """A copy of ``model`` whose blocks run learn2learn's own ``ReLU`` then ``MaxPool2d``."""
    reference = copy.deepcopy(model)
    for block in reference.features:
        block.relu, block.max_pool = nn.ReLU(), nn.MaxPool2d(block.max_pool.size, block.max_pool.size)
    return reference


@pytest.mark.parametrize(("layers", "image_size"), [(4, 28), (2, 28), (3, 21)])
def test_cnn4_pools_then_rectifies_with_learn2learns_values_and_maml_meta_gradient(layers: int,
                                                                                    image_size: int) -> None:
    """metalab's CNN4 max-pools then applies ReLU (on a CPU by a channels-last max-pool's indices): its output
    and its second-order MAML meta-gradient are those of learn2learn's ReLU then max-pool, ties included."""
    torch.manual_seed(0)
    model = CNN4(5, channels=1, image_size=image_size, hidden_size=8, layers=layers).double()
    first = model.features[0]
    with torch.no_grad():  # channels 0-1 constant (0.5 after batch norm): every window of theirs is a tie
        first.conv.weight[:2] = 0.0
        first.normalize.bias[:2] = 0.5
    reference = _with_learn2learns_relu_and_max_pool(model)
    support, query = torch.randn(5, 1, image_size, image_size).double(), torch.randn(20, 1, image_size, image_size)
    labels = torch.arange(5)

    def meta_gradient(network: nn.Module) -> list[Tensor]:
        learner = l2l.algorithms.MAML(network, lr=0.4).clone()
        learner.adapt(F.cross_entropy(learner(support), labels))
        return torch.autograd.grad(F.cross_entropy(learner(query.double()), labels.repeat(4)),
                                   list(network.parameters()))

    assert torch.equal(model(query.double()), reference(query.double()))
    ours, theirs = meta_gradient(model), meta_gradient(reference)
    assert ours[0].abs().sum() > 0
    for mine, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12)
