"""Proto-MAML (Triantafillou et al. 2020, §3): its head starts as the prototype classifier, its meta-gradient is
the derivative of the query loss after adaptation, and it takes episodes of any number of ways."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms import Context, ProtoMAML
from metalab.algorithms.protomaml import linear, prototype_head
from metalab.errors import ConfigError
from metalab.tasks.episodes import Task


def episode(ways: int, shots: int, queries: int, generator: torch.Generator) -> Task:
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    centres = torch.randn(ways, 4, generator=generator, dtype=torch.double)
    return Task(centres[support_y] + 0.3 * torch.randn(len(support_y), 4, generator=generator, dtype=torch.double),
                support_y,
                centres[query_y] + 0.3 * torch.randn(len(query_y), 4, generator=generator, dtype=torch.double),
                query_y)


def embedding() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_the_initial_head_is_the_prototype_classifier() -> None:
    """Its logits are ProtoNet's −‖x − c_k‖² plus ‖x‖², a constant per query: the same softmax."""
    generator = torch.Generator().manual_seed(0)
    support, labels = torch.randn(9, 5, generator=generator), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    query = torch.randn(4, 5, generator=generator)
    prototypes = torch.stack([support[labels == k].mean(0) for k in range(3)])
    protonet = -torch.cdist(query, prototypes).pow(2)
    head = linear(query, prototype_head(support, labels))
    torch.testing.assert_close(head - protonet, query.pow(2).sum(1, keepdim=True).expand(-1, 3))
    torch.testing.assert_close(head.softmax(1), protonet.softmax(1))


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_is_the_derivative_of_the_adapted_query_loss(steps: int) -> None:
    """Against central finite differences of the whole map θ → query loss after ``steps`` inner steps."""
    algorithm = ProtoMAML(embedding(), inner_lr=0.3, inner_steps=steps, first_order=False)
    task, context = episode(3, 2, 4, torch.Generator().manual_seed(1)), Context(F.cross_entropy, training=True)
    _, loss = algorithm.query_loss(task, context)
    gradient = torch.autograd.grad(loss, list(algorithm.parameters()))
    epsilon = 1e-6
    for parameter, analytic in zip(algorithm.parameters(), gradient, strict=True):
        for index in [0, parameter.numel() // 2, parameter.numel() - 1]:
            flat = parameter.data.view(-1)
            original = flat[index].item()
            values = []
            for shift in (epsilon, -epsilon):
                flat[index] = original + shift
                values.append(algorithm.query_loss(task, context)[1].item())
            flat[index] = original
            numeric = (values[0] - values[1]) / (2 * epsilon)
            assert analytic.view(-1)[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_first_order_meta_gradient_drops_the_inner_loops_second_derivatives_only() -> None:
    """First order: different from second order, yet still reaching the embedding through the prototypes
    (with zero inner learning rate the two agree: no inner step, no second-order term)."""
    task, context = episode(3, 2, 4, torch.Generator().manual_seed(2)), Context(F.cross_entropy, training=True)

    def meta_gradient(first_order: bool, inner_lr: float) -> list[torch.Tensor]:
        algorithm = ProtoMAML(embedding(), inner_lr=inner_lr, inner_steps=2, first_order=first_order)
        return list(torch.autograd.grad(algorithm.query_loss(task, context)[1], list(algorithm.parameters())))

    first, second = meta_gradient(True, 0.3), meta_gradient(False, 0.3)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(first, second, strict=True))
    assert all(g.abs().sum() > 0 for g in first)
    for a, b in zip(meta_gradient(True, 1e-12), meta_gradient(False, 1e-12), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


def test_adapts_to_episodes_of_any_number_of_ways_and_learns_the_support_set() -> None:
    algorithm = ProtoMAML(embedding(), inner_lr=0.3, inner_steps=5)
    context = Context(F.cross_entropy, training=False)
    generator = torch.Generator().manual_seed(3)
    for ways in (2, 5, 11):
        task = episode(ways, 3, 2, generator)
        with torch.enable_grad():
            predictor = algorithm.adapt(task, context)
        logits = predictor(task.query_x)
        assert logits.shape == (2 * ways, ways)
        before = F.cross_entropy(linear(algorithm._embedder()(dict(algorithm.embedding.named_parameters()),
                                                              task.support_x),
                                        prototype_head(algorithm.embedding(task.support_x), task.support_y)),
                                 task.support_y)
        after = F.cross_entropy(predictor(task.support_x), task.support_y)
        assert after < before  # the inner steps fit the support set


def test_bad_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^algorithm.eval_batch_norm must be transductive or running, got 'x'$"):
        ProtoMAML(embedding(), eval_batch_norm="x")
    with pytest.raises(ConfigError, match=r"^algorithm.inner_steps must be >= 1, got 0$"):
        ProtoMAML(embedding(), inner_steps=0)
