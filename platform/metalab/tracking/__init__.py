"""Experiment tracking back-ends, chosen by the ``tracking=`` config group."""

from metalab.tracking.base import Tracking
from metalab.tracking.mlflow_tracking import MLflowTracking
from metalab.tracking.none import NoTracking

__all__ = ["MLflowTracking", "NoTracking", "Tracking"]
