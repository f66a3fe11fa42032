"""Task families: each a LightningDataModule that yields meta-batches of few-shot episodes."""

from metalab.tasks.base import TaskFamily
from metalab.tasks.episodes import Episodes
from metalab.tasks.sinusoid import SinusoidRegression

__all__ = ["Episodes", "SinusoidRegression", "TaskFamily"]
