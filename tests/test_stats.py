"""The one interval rule: mean ± t(0.975, n − 1) · s / √n, for few seeds and many tasks alike."""

from __future__ import annotations

import math

import pytest
import torch

from metalab.stats import Z_95, ci95_half_width, mean_and_ci95, t_95


def test_three_seeds_use_students_t_not_the_normal_quantile() -> None:
    mean, ci95 = mean_and_ci95(torch.tensor([0.5, 0.6, 0.7]))
    assert mean == pytest.approx(0.6)
    assert ci95 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.3027, s = 0.1
    assert ci95 > 2 * Z_95 * 0.1 / math.sqrt(3)  # 1.96 would be 2.2× too narrow


@pytest.mark.parametrize(("n", "quantile"), [(2, 12.706205), (4, 3.182446), (10, 2.262157), (600, 1.963932)])
def test_t_quantiles_match_the_tables_and_approach_1_96(n: int, quantile: float) -> None:
    assert t_95(n) == pytest.approx(quantile, rel=1e-6)
    values = torch.arange(n, dtype=torch.float64)
    assert mean_and_ci95(values)[1] == pytest.approx(quantile * values.std().item() / math.sqrt(n), rel=1e-6)


def test_six_hundred_tasks_differ_from_the_papers_1_96_by_a_fifth_of_a_percent() -> None:
    assert 1 < t_95(600) / Z_95 < 1.0021


def test_one_value_has_no_interval_and_none_is_an_error() -> None:
    assert math.isnan(mean_and_ci95(torch.tensor([0.7]))[1]) and math.isnan(ci95_half_width(0.0, 1))
    with pytest.raises(ValueError, match="at least one value"):
        mean_and_ci95(torch.tensor([]))
