"""Meta-learning algorithms: each adapts the shared model to one task; the MetaLearner does the rest."""

from metalab.algorithms.base import MetaAlgorithm
from metalab.algorithms.maml import MAML

__all__ = ["MAML", "MetaAlgorithm"]
