"""Networks only: what a task's learner is. Algorithms wrap them; task families feed them."""

from metalab.models.mlp import MLP

__all__ = ["MLP"]
