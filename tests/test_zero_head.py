"""MAML with a zero head per episode (Triantafillou et al. 2020's fo-MAML on Meta-Dataset): episodes of any
number of ways, the features meta-learned and the model's own head not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms import MAML, Context
from metalab.errors import ConfigError
from metalab.runner import TaskRunner, vectorises
from tests.test_protomaml import episode


class FeaturesAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_each_episode_gets_a_zero_head_of_its_own_ways() -> None:
    algorithm = MAML(FeaturesAndHead().double(), inner_lr=0.5, inner_steps=3, zero_head=True)
    assert not algorithm.one_output_per_way and not vectorises(algorithm)
    generator, context = torch.Generator().manual_seed(0), Context(F.cross_entropy, training=False)
    for ways in (2, 7, 12):  # the model's own head has 5 outputs
        task = episode(ways, 3, 2, generator)
        with torch.enable_grad():
            predictor = algorithm.adapt(task, context)
        assert predictor(task.query_x).shape == (2 * ways, ways)
        assert F.cross_entropy(predictor(task.support_x), task.support_y) < torch.log(torch.tensor(ways))  # < zero head
    assert algorithm.unadapted(task, context) is None  # no pre_* metrics: before adaptation the head is zero
    assert torch.equal(algorithm.model.head.bias, FeaturesAndHead().double().head.bias)  # untouched


def test_zero_head_meta_gradient_reaches_the_features_only_and_is_the_derivative() -> None:
    algorithm = MAML(FeaturesAndHead().double(), inner_lr=0.5, inner_steps=2, zero_head=True)
    task, context = episode(3, 2, 4, torch.Generator().manual_seed(1)), Context(F.cross_entropy, training=True)
    gradient = algorithm.task_meta_gradient(task, context).gradient
    names = [name for name, _ in algorithm.named_parameters()]
    assert all((g is None) == ("head" in name) for name, g in zip(names, gradient, strict=True)), names
    weight = algorithm.model.features[0].weight
    analytic = gradient[names.index("maml.module.features.0.weight")]
    for index in [(0, 0), (3, 2)]:
        values = []
        for shift in (1e-6, -1e-6):
            with torch.no_grad():
                weight[index] += shift
            values.append(algorithm.query_loss(task, context)[1].item())
            with torch.no_grad():
                weight[index] -= shift
        assert analytic[index].item() == pytest.approx((values[0] - values[1]) / 2e-6, rel=1e-4, abs=1e-8)


def test_zero_head_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ConfigError, match=r"^algorithm.zero_head=true needs a model whose head is one linear layer "
                                          r"\(model.head\), and Sequential has none"):
        MAML(nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)), zero_head=True)
    with pytest.raises(ConfigError, match=r"^algorithm.zero_head=true and algorithm.inner_checkpointing=true"):
        MAML(FeaturesAndHead(), zero_head=True, inner_checkpointing=True)
    with pytest.raises(ConfigError, match=r"^runner.backend=vmap: MAML declares no vectorised_adapt \(or its "
                                          r"settings, e.g. algorithm.zero_head=true, rule it out\)"):
        TaskRunner("vmap").check(MAML(FeaturesAndHead(), zero_head=True))
