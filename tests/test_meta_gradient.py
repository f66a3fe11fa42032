"""The MetaLearner's meta-gradient equals the one of learn2learn's documented plain loop."""

from __future__ import annotations

import copy
import math

import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import MAML
from metalab.learner import MetaLearner
from metalab.models import MLP
from metalab.tasks import Episodes, SinusoidRegression


def double_tasks(count: int) -> Episodes:
    tasks = SinusoidRegression().sample(count, torch.Generator().manual_seed(3), "train")
    return Episodes(*(t.double() for t in (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)))


def plain_learn2learn_loop(model: torch.nn.Module, tasks, inner_lr: float, steps: int,
                           first_order: bool) -> list[torch.Tensor]:
    """learn2learn's README loop: clone → adapt on support → query loss → backward, averaged over tasks."""
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)
    for index in range(len(tasks)):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.mse_loss(learner(tasks.support_x[index]), tasks.support_y[index]))
        F.mse_loss(learner(tasks.query_x[index]), tasks.query_y[index]).backward()
    for parameter in maml.parameters():
        parameter.grad.mul_(1.0 / len(tasks))
    return [parameter.grad.clone() for parameter in model.parameters()]


@pytest.mark.parametrize(("first_order", "steps"), [(False, 1), (False, 3), (True, 2)])
def test_meta_gradient_matches_plain_learn2learn_loop(first_order: bool, steps: int) -> None:
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1).double()
    reference_model = copy.deepcopy(model)
    tasks = double_tasks(25)

    learner = MetaLearner(MAML(model, inner_lr=0.01, inner_steps=steps, first_order=first_order),
                          optimizer=torch.optim.Adam, problem="regression")
    learner.log = lambda *args, **kwargs: None  # no Trainer attached
    learner.training_step(tasks, 0).backward()
    ours = [parameter.grad for parameter in model.parameters()]
    reference = plain_learn2learn_loop(reference_model, tasks, 0.01, steps, first_order)

    assert len(ours) == len(reference) == 6
    for got, expected in zip(ours, reference, strict=True):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


def test_second_order_differs_from_first_order() -> None:
    """Guards the test above: the two settings must give measurably different meta-gradients."""
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1).double()
    tasks = double_tasks(5)
    second = plain_learn2learn_loop(copy.deepcopy(model), tasks, 0.5, 1, first_order=False)
    first = plain_learn2learn_loop(copy.deepcopy(model), tasks, 0.5, 1, first_order=True)
    difference = sum((a - b).norm().item() for a, b in zip(second, first, strict=True))
    assert difference > 1e-6 and not math.isnan(difference)
