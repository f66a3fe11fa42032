"""What was meta-learned, handed on: a run's learner as an MLflow Model that adapts to a new support set.

- ``problem``: the few-shot problem a served model takes (support and query rows) and the answer it gives;
- ``model``: the ``pyfunc`` model (``FewShotModel``) that rebuilds the learner and adapts as the run's test step;
- ``entry``: its code, as MLflow's models from code loads it;
- ``package``: writing the model folder at the end of a run, and handing it to the tracking (which logs and
  registers it: :mod:`metalab.tracking.registry`).

MLflow's model format lives here rather than in :mod:`metalab.tracking`: a served model is read by whoever loads
it, with no run or store; every call that writes to a store stays in ``tracking/``.
"""
