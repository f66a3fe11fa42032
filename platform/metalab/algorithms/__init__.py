"""Meta-learning algorithms: each adapts the shared model to one task; the MetaLearner does the rest."""

from metalab.algorithms.anil import ANIL
from metalab.algorithms.base import FitReport, GradientBasedAlgorithm, MetaAlgorithm
from metalab.algorithms.maml import MAML
from metalab.algorithms.metasgd import MetaSGD
from metalab.algorithms.protonet import ProtoNet
from metalab.algorithms.reptile import Reptile

__all__ = ["ANIL", "MAML", "FitReport", "GradientBasedAlgorithm", "MetaAlgorithm", "MetaSGD", "ProtoNet", "Reptile"]
