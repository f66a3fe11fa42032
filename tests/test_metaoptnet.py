"""MetaOptNet (Lee et al. 2019) and R2-D2 (Bertinetto et al. 2019): the ridge closed form against least squares, the
SVM's QP against a reference solver (KKT conditions), learn2learn's SVClassifier and finite differences."""

from __future__ import annotations

import math

import learn2learn as l2l
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from metalab.algorithms import R2D2, Context, MetaOptNet
from metalab.algorithms.metaoptnet import crammer_singer_dual
from metalab.algorithms.r2d2 import ridge_regression
from metalab.errors import ConfigError
from metalab.tasks.episodes import Task

TRAINING = Context(F.cross_entropy, training=True)


def episode(ways: int, shots: int, queries: int, features: int, seed: int, dtype=torch.double) -> Task:
    """Class centres plus noise: separable enough that a linear classifier fits, noisy enough that some SVM
    constraints bind and some do not."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(ways, features, generator=generator, dtype=dtype)
    support_y, query_y = torch.arange(ways).repeat(shots), torch.arange(ways).repeat(queries)
    noise = 0.8 * torch.randn(len(support_y) + len(query_y), features, generator=generator, dtype=dtype)
    return Task(centres[support_y] + noise[: len(support_y)], support_y, centres[query_y] + noise[len(support_y):],
                query_y)


@pytest.mark.parametrize(("samples", "features"), [(6, 10), (12, 4)])  # Woodbury (S ≤ D) and the primal (S > D)
def test_ridge_closed_form_is_the_least_squares_solution_of_the_regularised_system(samples: int, features: int) -> None:
    """argmin ‖xW − y‖² + λ‖W‖² is the least-squares solution of [x; √λ I] W = [y; 0]."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator, dtype=torch.double)
    y = torch.randn(samples, 3, generator=generator, dtype=torch.double)
    lam = 0.7
    augmented_x = torch.cat([x, math.sqrt(lam) * torch.eye(features, dtype=torch.double)])
    augmented_y = torch.cat([y, torch.zeros(features, 3, dtype=torch.double)])
    expected = torch.linalg.lstsq(augmented_x, augmented_y).solution
    torch.testing.assert_close(ridge_regression(x, y, lam), expected, rtol=1e-10, atol=1e-12)


def test_r2d2_logits_are_the_adjusted_ridge_regression_on_the_augmented_features() -> None:
    """As the authors' rr_woodbury: [x, 1] and one-hot y divided by √S, λ from log λ, then α(x_q W + b) + β."""
    task = episode(ways=3, shots=2, queries=4, features=5, seed=1)
    algorithm = R2D2(torch.nn.Identity(), ridge_lambda=2.0, scale=0.5)
    with torch.no_grad():
        algorithm.bias.fill_(0.25)
    logits = algorithm.adapt(task, TRAINING)(task.query_x)
    s = len(task.support_y)
    x = torch.cat([task.support_x, torch.ones(s, 1, dtype=torch.double)], 1) / math.sqrt(s)
    y = F.one_hot(task.support_y).double() / math.sqrt(s)
    wb = x.T @ torch.linalg.inv(x @ x.T + 2.0 * torch.eye(s, dtype=torch.double)) @ y  # (D + 1, N)
    torch.testing.assert_close(logits, 0.5 * (task.query_x @ wb[:-1] + wb[-1]) + 0.25)
    assert algorithm.log_lambda.requires_grad  # λ is meta-learned by default
    assert not R2D2(torch.nn.Identity(), learn_lambda=False).log_lambda.requires_grad


def test_metaoptnet_ridge_logits_are_the_authors_dual_solution() -> None:
    """MetaOptNetHead_Ridge: min ½ αᵀ((K + λI) ⊗ I)α − 2 vec(Y)ᵀα, so α = 2(K + λI)⁻¹Y, logits scale · q xᵀ α."""
    task = episode(ways=4, shots=3, queries=2, features=6, seed=2)
    algorithm = MetaOptNet(torch.nn.Identity(), head="ridge", ridge_lambda=50.0, scale=3.0)
    x = task.support_x
    alpha = 2 * torch.linalg.solve(x @ x.T + 50.0 * torch.eye(len(x), dtype=torch.double),
                                   F.one_hot(task.support_y).double())
    torch.testing.assert_close(algorithm.adapt(task, TRAINING)(task.query_x), 3.0 * task.query_x @ x.T @ alpha)


def reference_dual(support: np.ndarray, labels: np.ndarray, ways: int, c_reg: float) -> np.ndarray:
    """The same QP solved by scipy's SLSQP: min ½ zᵀQz + pᵀz s.t. z ≤ C vec(Y), Σ_n α_in = 0."""
    samples = len(support)
    one_hot = np.eye(ways)[labels].ravel()
    quadratic = np.kron(support @ support.T, np.eye(ways)) + np.eye(samples * ways)
    equality = np.kron(np.eye(samples), np.ones((1, ways)))
    constraints = [{"type": "ineq", "fun": lambda z: c_reg * one_hot - z, "jac": lambda z: -np.eye(len(z))},
                   {"type": "eq", "fun": lambda z: equality @ z, "jac": lambda z: equality}]
    # ftol 1e-12: at 1e-15 SLSQP's line search failed on 17 of 200 inputs perturbed by 1e-13 (CI's BLAS gave one);
    # at 1e-12 none of 1,200 failed and the solution stayed within 2e-7 of the tested solver's.
    result = minimize(lambda z: 0.5 * z @ quadratic @ z - one_hot @ z, np.zeros(samples * ways),
                      jac=lambda z: quadratic @ z - one_hot, method="SLSQP", constraints=constraints,
                      options={"ftol": 1e-12, "maxiter": 1000})
    assert result.success, result.message
    return result.x.reshape(samples, ways)


def kkt_residual(alpha: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, c_reg: float) -> float:
    """The largest violation of the KKT conditions of the dual QP at ``alpha`` (S, N). With g = Qz + p (S, N) and the
    multipliers ν_i of Σ_n α_in = 0 and λ_in ≥ 0 of α_in ≤ C y_in, stationarity is g_in + ν_i + λ_in = 0: on the
    inactive coordinates (λ_in = 0, at least one per row, since α_i = C y_i is not feasible) all g_in equal −ν_i;
    on the active ones λ_in = −g_in − ν_i must be ≥ 0."""
    upper = c_reg * F.one_hot(labels, alpha.shape[1]).to(alpha.dtype)
    gradient = (support @ support.T) @ alpha + alpha - upper / c_reg  # (K ⊗ I + I) z − vec(Y), as (S, N)
    active = alpha > upper - 1e-7
    residuals = [(alpha - upper).clamp(min=0).max(), alpha.sum(1).abs().max()]  # primal feasibility
    for row in range(len(alpha)):
        inactive = gradient[row][~active[row]]
        nu = -inactive.mean()
        residuals.append((inactive + nu).abs().max())  # stationarity where λ = 0
        if active[row].any():
            residuals.append((gradient[row][active[row]] + nu).clamp(min=0).max())  # λ = −g − ν ≥ 0
    return max(float(r) for r in residuals)


@pytest.mark.parametrize(("ways", "shots", "seed"), [(3, 2, 0), (5, 1, 1), (4, 3, 2), (2, 5, 3)])
def test_svm_dual_satisfies_kkt_and_matches_a_reference_solver(ways: int, shots: int, seed: int) -> None:
    task = episode(ways, shots, queries=1, features=4, seed=seed)
    alpha = crammer_singer_dual(task.support_x, task.support_y, ways, c_reg=0.1, max_iters=50)
    assert kkt_residual(alpha, task.support_x, task.support_y, 0.1) < 1e-5
    reference = reference_dual(task.support_x.numpy(), task.support_y.numpy(), ways, 0.1)
    np.testing.assert_allclose(alpha.numpy(), reference, atol=1e-5)
    binding = np.isclose(reference, 0.1 * np.eye(ways)[task.support_y.numpy()], atol=1e-6).sum()
    assert 0 < binding < alpha.numel()  # some constraints bind, some do not: not a trivial problem


def test_svm_logits_are_learn2learns_svclassifier_times_the_scale() -> None:
    """The same QP and logits as l2l.nn.SVClassifier (float32, which its one-hot labels fix), unnormalised and
    normalised."""
    task = episode(ways=5, shots=2, queries=3, features=16, seed=4, dtype=torch.float32)
    for normalize in (False, True):
        reference = l2l.nn.SVClassifier(task.support_x, task.support_y, ways=5, normalize=normalize)(task.query_x)
        algorithm = MetaOptNet(torch.nn.Identity(), head="svm", scale=2.0, normalize=normalize)
        torch.testing.assert_close(algorithm.adapt(task, TRAINING)(task.query_x), 2.0 * reference,
                                   rtol=1e-4, atol=1e-5)


def finite_difference_check(algorithm, task: Task, inputs: list[torch.Tensor], epsilon: float = 1e-6) -> None:
    """The autograd gradient of the query loss in each of ``inputs`` (support and query features, the algorithm's
    own parameters) against central differences, at a few coordinates each."""
    loss = algorithm.query_loss(task, TRAINING)[1]
    gradients = torch.autograd.grad(loss, inputs)
    for tensor, analytic in zip(inputs, gradients, strict=True):
        flat = tensor.data.view(-1)
        for index in sorted({0, flat.numel() // 3, flat.numel() - 1}):
            original = flat[index].item()
            values = []
            for shift in (epsilon, -epsilon):
                flat[index] = original + shift
                values.append(algorithm.query_loss(task, TRAINING)[1].item())
            flat[index] = original
            numeric = (values[0] - values[1]) / (2 * epsilon)
            assert analytic.view(-1)[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8), (tensor.shape, index)


@pytest.mark.parametrize("head", ["svm", "ridge"])
def test_metaoptnet_gradient_through_the_head_matches_finite_differences(head: str) -> None:
    """Through qpth's implicit differentiation of the KKT conditions (svm) or the closed form (ridge): the
    meta-gradient reaches the support embeddings through the fitted classifier."""
    task = episode(ways=3, shots=2, queries=3, features=4, seed=5)
    task = Task(task.support_x.clone().requires_grad_(), task.support_y, task.query_x.clone().requires_grad_(),
                task.query_y)
    algorithm = MetaOptNet(torch.nn.Identity(), head=head, svm_max_iters=50, scale=2.0).double()
    finite_difference_check(algorithm, task, [task.support_x, task.query_x, algorithm.scale])


def test_r2d2_gradient_in_features_lambda_scale_and_bias_matches_finite_differences() -> None:
    task = episode(ways=3, shots=2, queries=3, features=4, seed=6)
    task = Task(task.support_x.clone().requires_grad_(), task.support_y, task.query_x.clone().requires_grad_(),
                task.query_y)
    algorithm = R2D2(torch.nn.Identity(), ridge_lambda=0.5, scale=2.0).double()
    finite_difference_check(algorithm, task, [task.support_x, task.query_x, algorithm.log_lambda, algorithm.scale,
                                              algorithm.bias])


@pytest.mark.parametrize("algorithm", [MetaOptNet(torch.nn.Identity()), MetaOptNet(torch.nn.Identity(), head="ridge"),
                                       R2D2(torch.nn.Identity())], ids=["svm", "ridge", "r2d2"])
def test_any_number_of_ways_and_no_prediction_before_adaptation(algorithm) -> None:
    assert not algorithm.one_output_per_way and algorithm.problems == ("classification",)
    for ways in (2, 7):
        task = episode(ways, shots=2, queries=1, features=8, seed=ways, dtype=torch.float32)
        assert algorithm.adapt(task, TRAINING)(task.query_x).shape == (ways, ways)
        assert algorithm.unadapted(task, TRAINING) is None


@pytest.mark.parametrize(("make", "message"), [
    (lambda: MetaOptNet(torch.nn.Identity(), head="svn"), r"^algorithm.head must be svm or ridge, got 'svn'$"),
    (lambda: MetaOptNet(torch.nn.Identity(), svm_c_reg=0.0), r"^algorithm.svm_c_reg must be > 0, got 0.0$"),
    (lambda: MetaOptNet(torch.nn.Identity(), svm_max_iters=0), r"^algorithm.svm_max_iters must be >= 1, got 0$"),
    (lambda: MetaOptNet(torch.nn.Identity(), ridge_lambda=-1.0), r"^algorithm.ridge_lambda must be > 0, got -1.0$"),
    (lambda: MetaOptNet(torch.nn.Identity(), scale=0.0), r"^algorithm.scale must not be 0"),
    (lambda: MetaOptNet(torch.nn.Identity(), eval_batch_norm="eval"),
     r"^algorithm.eval_batch_norm must be transductive or running, got 'eval'$"),
    (lambda: R2D2(torch.nn.Identity(), ridge_lambda=0.0), r"^algorithm.ridge_lambda must be > 0, got 0.0$"),
    (lambda: R2D2(torch.nn.Identity(), scale=0.0), r"^algorithm.scale must not be 0"),
], ids=["head", "c_reg", "iters", "lambda", "scale", "batch_norm", "r2d2-lambda", "r2d2-scale"])
def test_bad_settings_are_one_line_config_errors(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        make()
    assert "\n" not in str(raised.value)
