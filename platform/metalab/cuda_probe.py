"""A cheap ``torch.cuda.is_available()`` on machines without an NVIDIA driver.

``import lightning_fabric`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so that asking about CUDA does not
initialise it before a fork). Under that setting torch answers ``is_available()`` by loading
``libnvidia-ml.so.1`` with ``ctypes`` on every call until CUDA is initialised, and on a machine without the
library that load fails every time. ``Optimizer.step`` asks once per step (its graph-capture health check):
about 60 µs a step on the 2-core CI machine, 5-9% of a sinusoid meta-iteration, which the plain learn2learn
loop (no Lightning) does not pay. Without the NVML library there is no NVIDIA driver, so there is no CUDA
to initialise and nothing to protect: there metalab drops the setting again and torch's own cached answer
is used. Where the library loads, Lightning's setting stays.
"""

from __future__ import annotations

import ctypes
import os

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
NVML_LIBRARY = "libnvidia-ml.so.1"


def nvml_loads() -> bool:
    """Whether NVIDIA's management library (installed with the driver) can be loaded."""
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return False
    return True


def cheap_cuda_check() -> None:
    """Drop Lightning's NVML-based CUDA check where NVML (hence a driver) is missing. Call after importing
    Lightning, before the first optimiser step."""
    if os.environ.get(NVML_CHECK) == "1" and not nvml_loads():
        del os.environ[NVML_CHECK]
