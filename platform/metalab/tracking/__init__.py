"""Experiment tracking: every call into MLflow lives in this package.

- ``uri``: the default store (:data:`DEFAULT_TRACKING_URI`), the reachability check, where artifacts go and
  the UI page of a run.
- ``base``, ``mlflow_tracking``, ``none``: a job's run, chosen by the ``tracking=`` config group.
- ``logger``: the Lightning logger of a tracked run, and :func:`report`, through which the learner records
  tags, figures and metrics.
- ``sweeps``: a Hydra multirun as a parent run (wired to Hydra by ``metalab.sweep``).
- ``runs``: reading runs back and annotating them (``metalab compare``, ``metalab reproduce``).
- ``liveness``: a run's host, pid and heartbeat tags, and which RUNNING runs are stale (``metalab runs``).
"""

from metalab.tracking.base import Tracking
from metalab.tracking.client import MAX_TAG_LENGTH
from metalab.tracking.logger import MLflowRunLogger, records_figures, report
from metalab.tracking.mlflow_tracking import MLflowTracking
from metalab.tracking.none import NoTracking
from metalab.tracking.runs import RunStore
from metalab.tracking.uri import DEFAULT_TRACKING_URI, default_tracking_uri

__all__ = ["DEFAULT_TRACKING_URI", "MAX_TAG_LENGTH", "MLflowRunLogger", "MLflowTracking", "NoTracking", "RunStore",
           "Tracking", "default_tracking_uri", "records_figures", "report"]
