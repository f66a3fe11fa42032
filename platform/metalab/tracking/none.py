"""``tracking=none``: nothing is recorded (quick local experiments)."""

from __future__ import annotations

from omegaconf import DictConfig

from metalab.tracking.base import RunInfo, Tracking


class NoTracking(Tracking):
    def describe(self) -> str:
        return "none (tracking=none: nothing is recorded)"

    def start(self, cfg: DictConfig, info: RunInfo) -> None:
        return None

    def finish(self, status: str, error: BaseException | None = None) -> None:
        return None
