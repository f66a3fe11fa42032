"""Lightning's NVML-based CUDA check is dropped where NVML is missing (metalab.cuda_probe)."""

from __future__ import annotations

import os

import pytest

from metalab import cuda_probe
from metalab.cuda_probe import NVML_CHECK, cheap_cuda_check, nvml_loads


def test_without_nvml_lightnings_check_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NVML_CHECK, "1")
    monkeypatch.setattr(cuda_probe, "nvml_loads", lambda: False)
    cheap_cuda_check()
    assert NVML_CHECK not in os.environ


def test_with_nvml_lightnings_check_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NVML_CHECK, "1")
    monkeypatch.setattr(cuda_probe, "nvml_loads", lambda: True)
    cheap_cuda_check()
    assert os.environ[NVML_CHECK] == "1"


def test_the_job_applies_it_after_importing_lightning() -> None:
    import lightning_fabric  # noqa: F401  (sets the check to "1" when first imported)

    import metalab.job  # noqa: F401  (what metalab-train imports when it runs a job)

    assert os.environ.get(NVML_CHECK) == ("1" if nvml_loads() else None)
