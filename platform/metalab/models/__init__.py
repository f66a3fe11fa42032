"""Networks only: what a task's learner is. Algorithms wrap them; task families feed them."""

from metalab.models.conv import CNN4, ResNet12
from metalab.models.mlp import MLP
from metalab.models.policy import GaussianMLPPolicy
from metalab.models.text import TextCNN, TextTransformer

__all__ = ["CNN4", "MLP", "GaussianMLPPolicy", "ResNet12", "TextCNN", "TextTransformer"]
