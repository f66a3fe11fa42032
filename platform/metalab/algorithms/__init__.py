"""Meta-learning algorithms: the maths of adapting to one task (see :mod:`metalab.algorithms.base`)."""

from metalab.algorithms.anil import ANIL
from metalab.algorithms.base import (
    Context,
    FitReport,
    GradientBasedAlgorithm,
    MetaAlgorithm,
    TaskGradient,
)
from metalab.algorithms.finetune import FineTune
from metalab.algorithms.imaml import IMAML
from metalab.algorithms.maml import MAML
from metalab.algorithms.maml_pp import MAMLPlusPlus
from metalab.algorithms.maml_trpo import MAMLTRPO
from metalab.algorithms.metaoptnet import MetaOptNet
from metalab.algorithms.metasgd import MetaSGD
from metalab.algorithms.protomaml import ProtoMAML
from metalab.algorithms.protonet import ProtoNet
from metalab.algorithms.r2d2 import R2D2
from metalab.algorithms.reptile import Reptile

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "MAMLTRPO",
    "R2D2",
    "Context",
    "FineTune",
    "FitReport",
    "GradientBasedAlgorithm",
    "MAMLPlusPlus",
    "MetaAlgorithm",
    "MetaOptNet",
    "MetaSGD",
    "ProtoMAML",
    "ProtoNet",
    "Reptile",
    "TaskGradient",
]
