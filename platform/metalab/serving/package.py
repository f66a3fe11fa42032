"""Writing a run's learner as an MLflow Model folder (``mlflow.pyfunc`` with metalab's ``python_model``, plus the
``pytorch`` flavour of the network), and handing it to the run's tracking at the end of a job.

The folder is written into the run's output folder (``<output dir>/model``) before anything is sent, so a store
that does not answer loses nothing: the tracking sends it as it sends every record (through the run's outbox, or
later with ``metalab sync``), and the folder stays a model ``mlflow.pyfunc.load_model`` reads offline.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from unittest import mock

import mlflow.pyfunc
import mlflow.pytorch
import mlflow.utils.environment
import torch
from mlflow.models import Model
from omegaconf import DictConfig, OmegaConf

from metalab._quiet import quiet_mlflow_models
from metalab.algorithms.base import MetaAlgorithm
from metalab.checks import kind
from metalab.errors import one_line
from metalab.learner import MetaLearner
from metalab.serving.problem import ProblemSpec, problem_frame, signature
from metalab.tasks.base import TaskFamily
from metalab.tasks.episodes import Task
from metalab.tasks.texts import TextClassFamily
from metalab.tracking.base import Tracking
from metalab.tracking.registry import MODEL_ARTIFACT_PATH, MODEL_TAG

MODEL_FOLDER = MODEL_ARTIFACT_PATH  # in the run's output folder, as in the run's artifacts
ENTRY = Path(__file__).with_name("entry.py")  # the model's code (MLflow's models from code)
# What the model needs, pinned to the versions that wrote it (inferring them would load the model in a subprocess).
REQUIREMENTS = ("metalab", "torch", "pytorch-lightning", "hydra-core", "mlflow", "pandas", "numpy", "learn2learn")


def unservable(algorithm: MetaAlgorithm, task: TaskFamily) -> str | None:
    """Why this run's learner is no served model, if it is not: an environment's policy adapts on rollouts it
    collects itself, not on a support set a caller could send."""
    if task.problem == "reinforcement":
        return (f"{type(algorithm).__name__} adapts a policy by rolling it out in the task's environment, and a served "
                "model receives no environment, only a support set")
    return None


def problem_spec(task: TaskFamily, algorithm: MetaAlgorithm, example: Task) -> ProblemSpec:
    """What the served model's problems are, read from the family and one of its episodes."""
    inputs = kind(task)
    shape = tuple(example.support_x["ids"].shape[1:] if inputs == "texts" else example.support_x.shape[1:])
    classification = task.problem == "classification"
    return ProblemSpec(problem=task.problem, inputs=inputs, shape=shape,
                       ways=task.ways if classification and algorithm.one_output_per_way else None,
                       outputs=1 if classification else int(example.support_y[0].numel()),
                       pad_id=task.pad_id if isinstance(task, TextClassFamily) else None)


def small_example(task: Task, classification: bool) -> Task:
    """The input example: a classification episode cut to one support example per class and one query per class
    (a mini-ImageNet episode as JSON would take megabytes); a regression episode as it is."""
    if not classification:
        return task
    first = [int((task.support_y == label).nonzero()[0]) for label in task.support_y.unique().tolist()]
    queries = list(range(min(len(first), len(task.query_y))))

    def pick(inputs: torch.Tensor | dict, rows: list[int]) -> torch.Tensor | dict:
        return {key: value[rows] for key, value in inputs.items()} if isinstance(inputs, dict) else inputs[rows]

    return Task(pick(task.support_x, first), task.support_y[first], pick(task.query_x, queries),
                task.query_y[queries])


def requirements() -> list[str]:
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


def save_model(path: Path, cfg: DictConfig, task: TaskFamily, learner: MetaLearner) -> Path:
    """Write ``learner`` (meta-trained on ``task`` with config ``cfg``) as an MLflow Model folder at ``path``
    (replaced if it exists: a resumed run's model is its last); return ``path``."""
    algorithm = learner.algorithm
    example = small_example(task.sample(1, torch.Generator().manual_seed(0), "test")[0],
                            task.problem == "classification")
    spec = problem_spec(task, algorithm, example)
    texts = None
    if isinstance(task, TextClassFamily):
        texts = task.tokenizer.decode_batch([row.tolist() for part in (example.support_x, example.query_x)
                                             for row in part["ids"]])
    classifier = getattr(algorithm, "classifier", None)
    about = {"step": int(learner.global_step), "algorithm": type(algorithm).__name__,
             "pretrain_classes": next(p.shape[0] for p in classifier.parameters() if p.ndim == 2)
             if classifier is not None else None}
    if path.exists():
        shutil.rmtree(path)
    # MLflow checks pip_requirements against the running environment, building importlib's map of every installed
    # package's files (~2 s a process); ours are the running versions (requirements()), so it cannot find a mismatch.
    no_recheck = mock.patch.object(mlflow.utils.environment, "warn_dependency_requirement_mismatches",
                                   lambda requirements: None)
    with tempfile.TemporaryDirectory() as scratch, quiet_mlflow_models(), no_recheck:
        files = Path(scratch)
        (files / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (files / "problem.json").write_text(spec.to_json())
        (files / "learner.json").write_text(json.dumps(about, indent=1))
        torch.save({name: value.detach().cpu() for name, value in algorithm.state_dict().items()},
                   files / "weights.pt")
        network = copy.deepcopy(algorithm.model).cpu().eval()
        # Pickled, not MLflow 3's default pt2: torch.export traces one input shape, and a few-shot network takes
        # any number of examples (its classes are metalab's, so loading it needs metalab, as the model does).
        mlflow.pytorch.save_model(network, files / "network", pip_requirements=requirements(),
                                  serialization_format="pickle")
        artifacts = {"config": files / "config.yaml", "problem": files / "problem.json",
                     "learner": files / "learner.json", "weights": files / "weights.pt", "network": files / "network"}
        if isinstance(task, TextClassFamily):
            task.tokenizer.save(str(files / "tokenizer.json"))
            artifacts["tokenizer"] = files / "tokenizer.json"
        flavours = Model()
        # The network alone, as mlflow.pytorch.load_model(<model>) gives it: its files are the "network" artifact.
        flavours.add_flavor(mlflow.pytorch.FLAVOR_NAME, model_data="artifacts/network/data",
                            pytorch_version=str(torch.__version__), code=None)
        mlflow.pyfunc.save_model(str(path), python_model=str(ENTRY), mlflow_model=flavours,
                                 artifacts={name: str(file) for name, file in artifacts.items()},
                                 signature=signature(spec), input_example=problem_frame(example, spec, texts),
                                 pip_requirements=requirements(),
                                 metadata={"metalab": {"problem": spec.problem, "inputs": spec.inputs,
                                                       "shape": list(spec.shape), "ways": spec.ways,
                                                       "algorithm": about["algorithm"]}})
    return path


def log_learner(tracking: Tracking, cfg: DictConfig, task: TaskFamily, learner: MetaLearner,
                metrics: dict[str, float]) -> None:
    """At the end of a finished run: save the learner as an MLflow Model in ``<output dir>/model`` and have the
    tracking log it (and register it, with ``tracking.register_as``). A failure is one warning line and a tag on
    the run, never a failed run: what was meta-learned is in the run's checkpoint all the same."""
    if not tracking.logs_models:
        return
    reason = unservable(learner.algorithm, task)
    if reason is not None:
        tracking.set_tags({MODEL_TAG: f"none: {reason}"})
        return
    try:
        folder = save_model(Path(cfg.output_dir) / MODEL_FOLDER, cfg, task, learner)
    except Exception as error:
        line = one_line(error)
        tracking.set_tags({MODEL_TAG: f"none: saving it failed: {line}"})
        print(f"metalab: warning: the learner was not saved as an MLflow Model ({line}); the run and its checkpoint "
              "are recorded all the same", file=sys.stderr, flush=True)
        return
    tracking.log_model(folder, {name: value for name, value in metrics.items() if name.startswith("meta_test/")})
