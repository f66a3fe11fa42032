"""A few-shot problem as a served model takes it, and its answers as the model gives them.

A problem is one table, one row per example (a pandas DataFrame; over HTTP MLflow's ``dataframe_split`` or
``dataframe_records``):

- ``set``: ``support`` or ``query``;
- the example: ``image`` (images: the C·H·W floats in [0, 1] of a (C, H, W) image, row-major, as the task
  family serves them), ``text`` (texts: the raw text, tokenised by the run's own tokeniser) or ``x`` (vectors:
  the D floats of one input, e.g. sinusoid's one x);
- ``label`` (classification: the support example's class, 0 … N−1, every class with at least one support row) or
  ``target`` (regression: the support example's D' output floats); ignored on query rows (give any, e.g. -1 or
  ``[0.0]``).

The answer has one row per query, in their order: ``label`` (the predicted class), ``score`` (its softmax
probability) and ``logits`` (the adapted model's raw outputs) for classification; ``value`` (the D' predicted
floats) for regression. :func:`signature` states both for MLflow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema
from torch import Tensor

from metalab.errors import ConfigError
from metalab.tasks.episodes import Inputs, Task

SET, SUPPORT, QUERY = "set", "support", "query"
LABEL, TARGET = "label", "target"
EXAMPLE = {"images": "image", "texts": "text", "vectors": "x"}  # the example's column, by kind of input


@dataclass(frozen=True)
class ProblemSpec:
    """What a served model's problems are: ``problem`` (``classification`` or ``regression``), ``inputs``
    (``images``, ``texts`` or ``vectors``), one example's ``shape`` ((C, H, W), (D,), or texts' (max_length,)),
    ``ways`` (the classes a problem must have where the head has one output per way; ``None``: any number),
    ``outputs`` (regression: floats per target) and texts' ``pad_id``."""

    problem: str
    inputs: str
    shape: tuple[int, ...]
    ways: int | None = None
    outputs: int = 1
    pad_id: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ProblemSpec:
        fields = json.loads(text)
        return cls(**fields | {"shape": tuple(fields["shape"])})

    @property
    def example(self) -> str:
        return EXAMPLE[self.inputs]

    @property
    def size(self) -> str:
        """One example's shape in words: ``1×28×28 (C×H×W)``."""
        names = {"images": " (C×H×W)", "vectors": "", "texts": " tokens"}[self.inputs]
        return "×".join(map(str, self.shape)) + names


def signature(spec: ProblemSpec) -> ModelSignature:
    """The model's input and output schema (see the module docstring)."""
    # Arrays of doubles: JSON numbers parse as float64, which MLflow refuses to narrow to a float32 column; the
    # model reads them as float32, which every float32 value survives exactly.
    example = ColSpec("string" if spec.inputs == "texts" else Array("double"), spec.example)
    if spec.problem == "classification":
        given, answer = ColSpec("long", LABEL), [ColSpec("long", LABEL), ColSpec("float", "score"),
                                                 ColSpec(Array("float"), "logits")]
    else:
        given, answer = ColSpec(Array("double"), TARGET), [ColSpec(Array("float"), "value")]
    return ModelSignature(Schema([ColSpec("string", SET), example, given]), Schema(answer))


def problem_frame(task: Task, spec: ProblemSpec, texts: list[str] | None = None) -> pd.DataFrame:
    """``task`` (a family's episode) as the table a served model takes (``texts``: a text family's examples as raw
    text, support then queries, since the episode holds token ids)."""
    count = len(task.support_y)
    sets = [SUPPORT] * count + [QUERY] * len(task.query_y)
    if spec.inputs == "texts":
        examples: list[Any] = list(texts or [])
    else:
        examples = [row.reshape(-1).numpy() for part in (task.support_x, task.query_x) for row in part]
    if spec.problem == "classification":
        given: list[Any] = task.support_y.tolist() + [-1] * len(task.query_y)
    else:
        given = [row.reshape(-1).numpy() for row in task.support_y] + [np.zeros(spec.outputs, np.float32)] * len(
            task.query_y)
    return pd.DataFrame({SET: sets, spec.example: examples, LABEL if spec.problem == "classification" else TARGET:
                         given})


def read_problem(frame: pd.DataFrame, spec: ProblemSpec, tokenize: Any = None) -> Task:
    """The :class:`Task` a table describes (queries' labels zero: unknown), or a one-line ConfigError that names
    what is wrong and the fix. ``tokenize``: texts → ``{"ids", "mask"}`` (a text model's tokeniser)."""
    if isinstance(frame, dict):  # a dict of columns
        frame = pd.DataFrame(frame)
    given = LABEL if spec.problem == "classification" else TARGET
    missing = [column for column in (SET, spec.example, given) if column not in frame.columns]
    if missing:
        raise ConfigError(f"the problem has no column {', '.join(map(repr, missing))}: give one row per example with "
                          f"columns {SET!r} (support or query), {spec.example!r} and {given!r}")
    sets = frame[SET].astype(str)
    unknown = sorted(set(sets) - {SUPPORT, QUERY})
    if unknown:
        raise ConfigError(f"column {SET!r} holds {', '.join(map(repr, unknown))}: each row is 'support' or 'query'")
    support, query = frame[sets == SUPPORT], frame[sets == QUERY]
    if query.empty:
        raise ConfigError(f"the problem has no query rows ({SET}=query): give at least one example to predict")
    if support.empty:
        raise ConfigError(f"the problem has no support rows ({SET}=support): give labelled examples to adapt to")
    support_x, query_x = (examples(part[spec.example], spec, tokenize) for part in (support, query))
    if spec.problem == "classification":
        support_y = class_labels(support[LABEL], spec)
        query_y = torch.zeros(len(query), dtype=torch.long)
    else:
        support_y = vectors(support[TARGET], (spec.outputs,), TARGET, "target floats")
        query_y = torch.zeros(len(query), spec.outputs)
    return Task(support_x, support_y, query_x, query_y)


def class_labels(column: pd.Series, spec: ProblemSpec) -> Tensor:
    """Support labels 0 … N−1, each class present; N = the model's ways where its head has one output per way."""
    try:
        labels = column.to_numpy().astype(np.int64)
    except (TypeError, ValueError):
        raise ConfigError(f"column {LABEL!r} must hold class numbers 0 … N−1 on support rows") from None
    classes = int(labels.max()) + 1
    if labels.min() < 0:
        raise ConfigError(f"support label {int(labels.min())} is negative: number the classes 0 … N−1")
    absent = sorted(set(range(classes)) - set(labels.tolist()))
    if absent:
        raise ConfigError(f"class {absent[0]} has no support example (support labels run to {classes - 1}): give "
                          f"every class 0 … {classes - 1} at least one support row, or renumber the classes")
    if spec.ways is not None and classes != spec.ways:
        raise ConfigError(f"the support set has {classes} classes but the model was meta-trained for {spec.ways}-way "
                          f"problems (its head has one output per way): give {spec.ways} classes")
    return torch.from_numpy(labels)


def examples(column: pd.Series, spec: ProblemSpec, tokenize: Any) -> Inputs:
    """A column of examples as the model's inputs: images (n, C, H, W) in [0, 1], vectors (n, D), texts tokenised."""
    if spec.inputs == "texts":
        texts = column.tolist()
        if not all(isinstance(text, str) and text.strip() for text in texts):
            raise ConfigError(f"column {spec.example!r} must hold a non-empty text in every row")
        return tokenize(texts)
    what = "image floats" if spec.inputs == "images" else "input floats"
    inputs = vectors(column, spec.shape, spec.example, what)
    if spec.inputs == "images" and not bool(((inputs >= 0) & (inputs <= 1)).all()):
        raise ConfigError(f"image values must be in [0, 1] (the family serves pixel / 255), these run from "
                          f"{float(inputs.min()):g} to {float(inputs.max()):g}: divide 8-bit pixels by 255")
    return inputs


def vectors(column: pd.Series, shape: tuple[int, ...], name: str, what: str) -> Tensor:
    """Rows of floats (each ``prod(shape)`` long) as one float32 tensor (n, *shape)."""
    expected = int(np.prod(shape))
    rows = []
    for index, value in enumerate(column):
        row = np.asarray(value, dtype=np.float32).reshape(-1)
        if row.size != expected:
            size = "×".join(map(str, shape))
            raise ConfigError(f"{name} of row {column.index[index]} has {row.size} values, the model takes {expected} "
                              f"({what}, {size}): give examples of the size the model was meta-trained on")
        rows.append(row)
    return torch.from_numpy(np.stack(rows)).reshape(len(rows), *shape)


def answers(predictions: Tensor, spec: ProblemSpec) -> pd.DataFrame:
    """The adapted model's query outputs (Q, N) or (Q, D') as the answer table (see the module docstring)."""
    predictions = predictions.detach().float().cpu()
    if spec.problem != "classification":
        return pd.DataFrame({"value": list(predictions.reshape(len(predictions), -1).numpy())})
    scores, labels = predictions.softmax(dim=-1).max(dim=-1)
    return pd.DataFrame({LABEL: labels.numpy(), "score": scores.numpy(), "logits": list(predictions.numpy())})
