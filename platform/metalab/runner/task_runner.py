"""How the tasks of a meta-batch are executed: one after another, on CPU threads, or vectorised.

The algorithm says what to compute for one task (:mod:`metalab.algorithms.base`); the runner decides
how a meta-batch's tasks are scheduled, and hands Lightning one meta-loss whose ``backward()`` delivers
the mean of the tasks' meta-gradients.

- ``loop``: one task after another; each task's meta-gradient is taken as soon as the task is adapted, so
  only one task's graph is alive at a time (as in learn2learn's plain loop, one ``backward()`` per task).
- ``threads``: the loop's per-task work on CPU worker threads, one intra-op thread each (:mod:`.threads`).
- ``vmap``: the whole meta-batch at once through the algorithm's ``vectorised_adapt``; only for algorithms
  that declare it, and not with ``algorithm.inner_checkpointing=true`` (``torch.func`` transforms do not
  support the saved-tensor hooks that checkpointing is built on). A ragged meta-batch (tasks of their own
  support and query sizes) runs padded to its largest sets with masks (:mod:`.padding`): padded examples weigh
  zero in every loss and in batch norm's statistics, so each task's loss and meta-gradient are its unpadded
  ones; this needs a ``vectorised_adapt`` that takes ``support_mask`` (:func:`pads_ragged`). A stacked meta-batch
  is not padded.
- ``auto``: times each candidate on the first meta-iterations, which are real training steps (so the probe
  costs only what a slower candidate loses, not extra meta-batches): a warm-up step with each candidate, one
  timed step each (forward and backward), and one more for the candidates within ``PROBE_CLOSE`` of the fastest
  (``threads`` only on a CPU with more than one thread); then it keeps the fastest (``vmap`` only if it beats
  the loop by more than ``vmap_margin``). A candidate that fails is dropped, the reason recorded, and that step
  done by the loop. The backends give the same meta-gradient (tests/test_backends.py), so which one did a step
  does not change the run. A run that ends before the probe does keeps the fastest measured so far.

An algorithm with ``sequential_tasks`` (each task starts from state the one before left, e.g. Reptile's
carried inner Adam) runs with the loop only: its result depends on task order, which ``threads`` and ``vmap``
do not keep. ``threads`` and ``vmap`` are refused for it, and ``auto`` takes the loop without timing (timing
would run extra tasks through that state).

Evaluation (:meth:`TaskRunner.predictions`) adapts with the same backend (padded too), first order and with no
graph back to the meta-parameters; the unadapted predictions of a stacked meta-batch are one ``vmap`` over its
tasks.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalab.algorithms.base import Context, MetaAlgorithm
from metalab.algorithms.functional import batch_statistics_only, masked_mean
from metalab.errors import ConfigError, one_line
from metalab.runner.padding import Padded, pad
from metalab.runner.threads import map_tasks, with_gradient
from metalab.tasks.episodes import Episodes

BACKENDS = ("loop", "threads", "vmap", "auto")
PROBE_CLOSE = 1.3  # auto times candidates within this factor of the fastest once more (the rest cannot win)
NO_VMAP = "torch.func transforms do not support the saved-tensor hooks of checkpointing"  # why it rules vmap out
Predictions = Tensor | list[Tensor]  # stacked (T, Q, *out) when every task has one shape, else one per task


def vectorises(algorithm: MetaAlgorithm) -> bool:
    """Whether ``algorithm`` declares ``vectorised_adapt`` (opt-in to ``backend=vmap``)."""
    return callable(getattr(algorithm, "vectorised_adapt", None))


def pads_ragged(algorithm: MetaAlgorithm) -> bool:
    """Whether ``algorithm`` vectorises ragged meta-batches too: its ``vectorised_adapt`` takes ``support_mask``
    (padded examples weigh zero) and returns a predictor that takes ``query_mask``."""
    return vectorises(algorithm) and "support_mask" in inspect.signature(algorithm.vectorised_adapt).parameters


class TaskRunner:
    """Executes an algorithm over meta-batches with the chosen backend (see the module docstring).

    Arguments:
        backend: ``loop``, ``threads``, ``vmap`` or ``auto``.
        vmap_margin: how much faster than the loop ``vmap`` must be for ``auto`` to keep it (it has other
            numerics and more memory); ``threads`` runs the loop's own computation, so faster at all is enough.

    Once ``auto`` has decided (after at most ``3 · candidates`` meta-iterations), ``chosen`` is the backend in
    use and ``probe`` holds what it measured (``{"loop": "12.3 ms", "vmap": "failed: RuntimeError: …"}``).
    """

    def __init__(self, backend: str = "auto", vmap_margin: float = 0.05) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"runner.backend must be {', '.join(BACKENDS[:-1])} or auto, got {backend!r}")
        if not 0 <= vmap_margin < 1:
            raise ConfigError(f"runner.vmap_margin must be in [0, 1), got {vmap_margin}")
        self.backend = backend
        self.vmap_margin = vmap_margin
        self.chosen: str | None = None if backend == "auto" else backend
        self.probe: dict[str, str] = {}
        self._trials: list[tuple[str, bool]] | None = None  # auto's steps to come: (backend, timed), in order
        self._seconds: dict[str, list[float]] = {}  # auto's timings: warm-up first, then the timed steps
        self._second_round = False

    def check(self, algorithm: MetaAlgorithm) -> None:
        """Refuse a backend the algorithm cannot run, before anything is trained."""
        if self.backend in ("threads", "vmap") and algorithm.sequential_tasks:
            raise ConfigError(f"runner.backend={self.backend}: {type(algorithm).__name__} as configured starts each "
                              "task from the state the previous task left (e.g. algorithm.carry_inner_state=true), "
                              "so its tasks must run one after another: use runner.backend=loop or auto")
        if self.backend == "threads" and not algorithm.thread_safe:
            raise ConfigError(f"runner.backend=threads: {type(algorithm).__name__} adapts a task by swapping the "
                              "model's parameters in place, so tasks cannot run on threads at once: use "
                              "runner.backend=loop or auto")
        if self.backend == "vmap" and not vectorises(algorithm):
            raise ConfigError(f"runner.backend=vmap: {type(algorithm).__name__} declares no vectorised_adapt, so it "
                              "cannot run vectorised: use runner.backend=loop, threads or auto")
        if self.backend == "vmap" and _checkpoints_inner_loop(algorithm):
            raise ConfigError(f"runner.backend=vmap cannot run with algorithm.inner_checkpointing=true ({NO_VMAP}): "
                              "use runner.backend=loop, threads or auto, or set algorithm.inner_checkpointing=false")

    def meta_loss(self, algorithm: MetaAlgorithm, episodes: Episodes, context: Context,
                  agree: Callable[[str], str] | None = None) -> tuple[Predictions, Tensor]:
        """The meta-batch's query predictions (no graph) and the mean query loss, whose ``backward()``
        gives the meta-parameters the mean of the tasks' meta-gradients.

        ``agree``: with several processes, turns this process's choice of backend into the one every
        process uses (rank 0's).
        """
        if self.chosen is None and self._trials is None:
            self._trials = self._plan(algorithm, episodes)
        if self.chosen is None:
            result = self._trial(*self._trials.pop(0), algorithm, episodes, context)
            if not self._trials:  # the probe's last step: choose (or plan the second round)
                self.settle(agree)
            return result
        return self._meta_loss(self.chosen, algorithm, episodes, context)

    def settle(self, agree: Callable[[str], str] | None = None) -> None:
        """End ``auto``'s probe now: keep the fastest candidate measured (timed steps first, else warm-ups), or
        plan the second round of timing if it is due. No-op once chosen or before the probe began."""
        if self.chosen is not None or self._trials is None:
            return
        timed = {name: min(times[1:]) for name, times in self._seconds.items() if len(times) > 1}
        close = [name for name in timed if timed[name] <= PROBE_CLOSE * min(timed.values())] if timed else []
        if not self._trials and not self._second_round and len(close) > 1:
            self._second_round = True
            self._trials = [(name, True) for name in close]
            return
        seconds = timed or {name: times[0] for name, times in self._seconds.items()}
        self.probe = {name: f"{seconds[name] * 1000:.1f} ms" if name in seconds else self.probe.get(name, "not timed")
                      for name in self.probe}
        needed = {"loop": 1.0, "threads": 1.0, "vmap": 1.0 - self.vmap_margin}
        reference = seconds.get("loop", min(seconds.values(), default=0.0))
        qualified = [name for name in seconds if seconds[name] <= needed[name] * reference]
        self.chosen = min(qualified, key=seconds.__getitem__) if qualified else "loop"
        self._trials = []
        if agree is not None:
            self.chosen = agree(self.chosen)

    @staticmethod
    def share(episodes: Episodes, rank: int, world_size: int) -> tuple[Episodes, float]:
        """Process ``rank``'s contiguous share of a meta-batch every process drew (sizes differ by at most
        one), and the factor for its mean loss: DDP averages the processes' gradients, so share r's mean
        weighted by ``len(share) · world_size / len(episodes)`` makes that average the whole meta-batch's
        mean meta-gradient, even split unevenly."""
        if world_size == 1:
            return episodes, 1.0
        bounds = [len(episodes) * r // world_size for r in range(world_size + 1)]
        local = episodes[bounds[rank]:bounds[rank + 1]]
        return local, len(local) * world_size / len(episodes)

    def predictions(self, algorithm: MetaAlgorithm, episodes: Episodes, context: Context) -> Predictions:
        """Each task's query predictions after adaptation (evaluation), with the chosen backend (the loop
        before one is chosen). No graph reaches the meta-parameters: ``context`` is evaluation's (first-order
        inner steps), the vectorised inner loop runs under ``no_grad`` (``torch.func.grad`` differentiates it
        all the same), and the others enable gradients for the adaptation alone."""
        context = context.evaluating()
        backend = self.chosen or "loop"
        if backend == "vmap" and episodes.stacked:
            with torch.no_grad():
                predictions = algorithm.vectorised_adapt(episodes.support_x, episodes.support_y, context)(
                    episodes.query_x)
            return _own(predictions, algorithm, episodes)
        if backend == "vmap" and pads_ragged(algorithm):
            padded = pad(episodes)
            with torch.no_grad():
                return _own(_padded_predictions(algorithm, padded, context), algorithm, episodes, padded.query_sizes)

        def predict(index: int) -> Tensor:
            task = episodes[index]
            with torch.enable_grad():  # the inner loop differentiates the support loss
                predictor = algorithm.adapt(task, context)
            with torch.no_grad():
                return predictor(task.query_x)

        return _stacked(map_tasks(predict, len(episodes), threaded=backend == "threads"))

    @staticmethod
    def unadapted_predictions(algorithm: MetaAlgorithm, episodes: Episodes, context: Context) -> Predictions | None:
        """Each task's query predictions before adaptation (evaluation's ``pre_*`` metrics); ``None`` where the
        algorithm has no unadapted predictor (ProtoNet).

        Where every task has the same predictor (the shared initialisation) and one shape, the stacked queries
        (T, Q, *x) go through it in one ``vmap`` over tasks: each task keeps its own batch-norm statistics in
        ``transductive`` mode, as one task at a time would. Otherwise one task after another.
        """
        context = context.evaluating()
        predictors = [algorithm.unadapted(task, context) for task in episodes]
        if predictors[0] is None:
            return None
        shared = predictors[0]
        with torch.no_grad():
            if episodes.stacked and isinstance(shared, nn.Module) and all(p is shared for p in predictors):
                with batch_statistics_only(shared):  # batch norm that vmap can map, and that writes no statistics
                    return vmap(shared, randomness="different")(episodes.query_x)
            return _stacked([predictor(task.query_x) for predictor, task in zip(predictors, episodes, strict=True)])

    def _meta_loss(self, backend: str, algorithm: MetaAlgorithm, episodes: Episodes,
                   context: Context) -> tuple[Predictions, Tensor]:
        if backend == "vmap" and episodes.stacked:
            predictions = algorithm.vectorised_adapt(episodes.support_x, episodes.support_y, context)(episodes.query_x)
            # every task has Q queries: the mean over all T·Q queries is the mean of the tasks' mean losses (a zero
            # head's missing classes, at the lowest logit, add exactly nothing to a task's cross-entropy)
            loss = context.loss_fn(predictions.flatten(0, 1), episodes.query_y.flatten(0, 1))
            return _own(predictions.detach(), algorithm, episodes), loss
        if backend == "vmap":
            if not pads_ragged(algorithm):
                raise ConfigError(f"runner.backend=vmap: this task family draws tasks of varying sizes, and "
                                  f"{type(algorithm).__name__}.vectorised_adapt takes no support_mask to pad them "
                                  "with: use runner.backend=loop, threads or auto")
            padded = pad(episodes)
            predictions = _padded_predictions(algorithm, padded, context)  # (T, Q_max, *out)
            losses = vmap(lambda p, y, m: masked_mean(context.loss_fn, p, y, m))(
                predictions, padded.query_y, padded.query_mask)  # (T,): each task's mean over its real queries
            return _own(predictions.detach(), algorithm, episodes, padded.query_sizes), losses.mean()
        parameters = algorithm.meta_parameters()
        outcomes = map_tasks(lambda index: algorithm.task_meta_gradient(episodes[index], context), len(episodes),
                             threaded=backend == "threads")
        mean_gradient = [torch.stack(used).sum(0) / len(episodes) if (used := [g for g in per_task if g is not None])
                         else None for per_task in zip(*(o.gradient for o in outcomes), strict=True)]
        loss = torch.stack([o.loss for o in outcomes]).mean()
        return _stacked([o.prediction for o in outcomes]), with_gradient(loss, parameters, mean_gradient)

    def _plan(self, algorithm: MetaAlgorithm, episodes: Episodes) -> list[tuple[str, bool]]:
        """``auto``'s candidates for this algorithm and meta-batch, each a warm-up step then a timed one (in
        ``probe``, in order); with a single candidate, that one is chosen at once."""
        if algorithm.sequential_tasks:
            self.probe, self.chosen = {"loop": "only candidate (sequential_tasks)"}, "loop"
            return []
        candidates = ["loop"]
        if _on_cpu(episodes) and torch.get_num_threads() > 1 and algorithm.thread_safe:
            candidates.append("threads")
        if vectorises(algorithm) and (episodes.stacked or pads_ragged(algorithm)):
            candidates.append("vmap")
        self.probe = dict.fromkeys(candidates, "not timed")
        if "vmap" in candidates and _checkpoints_inner_loop(algorithm):  # a failure: never timed, never chosen
            self.probe["vmap"] = f"failed: algorithm.inner_checkpointing=true ({NO_VMAP})"
            candidates.remove("vmap")
        if len(candidates) == 1:
            self.chosen = "loop"
            return []
        return [(name, False) for name in candidates] + [(name, True) for name in candidates]

    def _trial(self, backend: str, timed: bool, algorithm: MetaAlgorithm, episodes: Episodes,
               context: Context) -> tuple[Predictions, Tensor]:
        """One probe step: this meta-batch's meta-loss with ``backend``, its meta-gradient taken here (so the
        time covers forward and backward, and a failing backward is caught) and handed on through
        ``with_gradient``. A candidate that fails is dropped, its reason kept, and the loop does the step."""
        parameters = algorithm.meta_parameters()
        start = time.perf_counter()
        try:
            predictions, loss = self._meta_loss(backend, algorithm, episodes, context)
            gradient = list(torch.autograd.grad(loss, parameters, allow_unused=True))
        except Exception as error:
            if backend == "loop":  # the reference itself fails: that is the run's error, not the probe's
                raise
            self.probe[backend] = f"failed: {one_line(error)[:200]}"
            self._trials = [trial for trial in self._trials if trial[0] != backend]
            self._seconds.pop(backend, None)
            return self._meta_loss("loop", algorithm, episodes, context)
        self._seconds.setdefault(backend, []).append(time.perf_counter() - start)
        return predictions, with_gradient(loss.detach(), parameters, gradient)


def _padded_predictions(algorithm: MetaAlgorithm, padded: Padded, context: Context) -> Tensor:
    """The padded meta-batch's query predictions (T, Q_max, *out), the padded examples weighing zero."""
    predict = algorithm.vectorised_adapt(padded.support_x, padded.support_y, context, support_mask=padded.support_mask)
    return predict(padded.query_x, query_mask=padded.query_mask)


def _own(predictions: Tensor, algorithm: MetaAlgorithm, episodes: Episodes,
         query_sizes: list[int] | None = None) -> Predictions:
    """Each task's own part of vectorised predictions (T, Q, *out), as the loop gives them: its real queries
    (``query_sizes``: the padding follows them), and, from an algorithm whose head is built per episode (no
    ``one_output_per_way``: a zero head, of the meta-batch's largest ways), its own ways' outputs. Unchanged
    where there is nothing to cut (a stacked meta-batch of one number of ways)."""
    ways = None
    if not algorithm.one_output_per_way:
        labels = episodes.support_y
        ways = (labels.flatten(1).amax(1) + 1 if episodes.stacked else torch.stack([y.max() + 1 for y in labels]))
        ways = None if bool((ways == predictions.shape[-1]).all()) else ways.tolist()
    if query_sizes is None and ways is None:
        return predictions
    sizes = query_sizes or [predictions.shape[1]] * len(predictions)
    return _stacked([task[:size] if ways is None else task[:size, :ways[index]]
                     for index, (task, size) in enumerate(zip(predictions, sizes, strict=True))])


def _checkpoints_inner_loop(algorithm: MetaAlgorithm) -> bool:
    return getattr(algorithm, "inner_checkpointing", False)


def _on_cpu(episodes: Episodes) -> bool:
    return episodes[0].support_y.device.type == "cpu"


def _stacked(predictions: list[Any]) -> Predictions:
    """One tensor when every task's predictions have one shape (fixed-way families), else the list."""
    if all(p.shape == predictions[0].shape for p in predictions):
        return torch.stack(predictions)
    return predictions
