"""Execution of meta-batches: which backend runs the tasks (see :mod:`metalab.runner.task_runner`)."""

from metalab.runner.task_runner import BACKENDS, TaskRunner, pads_ragged, vectorises

__all__ = ["BACKENDS", "TaskRunner", "pads_ragged", "vectorises"]
