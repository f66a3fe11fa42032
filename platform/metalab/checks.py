"""Checks that the configured pieces fit together, run before anything is trained or recorded.

Each raises :class:`~metalab.errors.ConfigError` with one line naming the keys and the fix.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import InterpolationKeyError

from metalab.algorithms.base import MetaAlgorithm
from metalab.errors import ConfigError
from metalab.learner import MetaLearner
from metalab.models import ResNet12
from metalab.tasks.base import TaskFamily
from metalab.tasks.classification import ClassificationFamily, Pretraining
from metalab.tasks.episodes import Inputs
from metalab.tasks.texts import TextClassFamily

MODELS_FOR = {"images": "model=cnn4 or resnet12", "texts": "model=text_cnn or transformer", "vectors": "model=mlp",
              "observations": "model=gaussian_mlp"}


def require_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("hardware=gpu needs a CUDA device and none is visible: use hardware=cpu")


# learn2learn's ResNet-12 max-pools by 2 (flooring) in each of its four blocks, then average-pools 5×5 into one
# 640-vector: only sides with ⌊side / 16⌋ = 5, i.e. 80–95 px, give the head its 640 inputs (84 is
# mini-ImageNet's). Smaller sides fail in the pooling or, at 64–79 px, divide by zero in DropBlock's rate.
RESNET12_SIDES = range(80, 96)


def build_model(cfg: DictConfig, task: TaskFamily) -> torch.nn.Module:
    """The model of ``cfg.model``, sized from the task (``${task.ways}``, ``${task.vocab_size}``, ...); a model that
    reads a task setting this task has not (``model=cnn4`` on texts) is one line naming both."""
    try:
        return instantiate(cfg.model)
    except InterpolationKeyError as error:
        key = str(error).split("'")[1] if str(error).count("'") >= 2 else "a task setting"
        choices = HydraConfig.get().runtime.choices
        raise ConfigError(f"model={choices.get('model')} reads {key}, which task={choices.get('task')} does not have: "
                          f"this task's inputs are {kind(task)}: use {MODELS_FOR[kind(task)]}") from None


def kind(task: TaskFamily) -> str:
    """What a task's inputs are: ``images``, ``texts``, ``vectors`` or (an environment's) ``observations``."""
    if isinstance(task, TextClassFamily):
        return "texts"
    if task.problem == "reinforcement":
        return "observations"
    return "images" if task.problem == "classification" else "vectors"


def check_model_fits(model: torch.nn.Module, task: TaskFamily) -> None:
    """One forward pass on one task's support set (an environment's: one observation), so a model/task mismatch
    stops the run at start; a policy must give a (mean, log_std) pair of the action's size."""
    if task.problem == "reinforcement":
        check_policy_fits(model, task)
        return
    support_x = task.sample(1, torch.Generator().manual_seed(0), "train")[0].support_x
    was_training = model.training
    model.eval()  # no batch-norm statistics are touched
    try:
        with torch.no_grad():
            model(support_x)
    except (RuntimeError, ZeroDivisionError, TypeError, IndexError, KeyError, AttributeError) as error:
        # TypeError and the rest: an image network given a text's {"ids", "mask"}, or a text encoder given a tensor
        raise ConfigError(f"model {type(model).__name__} does not take task {task.name}'s inputs of shape "
                          f"{shape(support_x)} ({' '.join(str(error).split())[:120]}): "
                          f"{what_fits(model, support_x, task)}") from None
    finally:
        model.train(was_training)


def check_policy_fits(model: torch.nn.Module, task: TaskFamily) -> None:
    observation = torch.zeros(1, task.observation_size)
    try:
        with torch.no_grad():
            output = model(observation)
    except RuntimeError as error:
        output = error
    if not (isinstance(output, tuple) and len(output) == 2 and all(
            isinstance(part, torch.Tensor) and part.shape == (1, task.action_size) for part in output)):
        raise ConfigError(f"model {type(model).__name__} is not a policy for task {task.name} (observations of size "
                          f"{task.observation_size} → the mean and log-std of actions of size {task.action_size}): "
                          f"use {MODELS_FOR['observations']}")


def shape(inputs: Inputs) -> str:
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{key!r}: {tuple(value.shape)}" for key, value in inputs.items()) + "}"
    return str(tuple(inputs.shape))


def what_fits(model: torch.nn.Module, inputs: Inputs, task: TaskFamily) -> str:
    """The fix for ``inputs`` that ``model`` does not take: its input size, where it needs one, else the models
    for this kind of task."""
    if isinstance(model, ResNet12) and not isinstance(inputs, dict) and inputs.ndim == 4 \
            and inputs.shape[-1] not in RESNET12_SIDES:
        return (f"ResNet-12 needs 84×84 images (any side of {RESNET12_SIDES.start}–{RESNET12_SIDES.stop - 1} px), "
                f"these are {inputs.shape[-2]}×{inputs.shape[-1]}: set task.image_size=84, or use model=cnn4 (sized "
                "from the task)")
    return f"this task's inputs are {kind(task)}: use {MODELS_FOR[kind(task)]}"


def check_algorithm_fits(algorithm: MetaAlgorithm, task: TaskFamily) -> None:
    """The algorithm learns this kind of task, and a head of one output per way sees one number of ways."""
    choices = HydraConfig.get().runtime.choices
    if task.problem not in algorithm.problems:
        raise ConfigError(f"algorithm={choices.get('algorithm')} learns {' and '.join(algorithm.problems)} tasks "
                          f"only, and task={choices.get('task')} is {task.problem}: choose another algorithm or task")
    if algorithm.one_output_per_way and getattr(task, "sampler", "fixed") == "meta_dataset":
        zero_head = "set algorithm.zero_head=true (a zero head per episode), " if hasattr(algorithm, "zero_head") \
            else ""
        raise ConfigError(f"task.sampler=meta_dataset draws episodes of varying ways, but "
                          f"algorithm={choices.get('algorithm')} predicts with a head of one output per way: "
                          f"{zero_head}use an algorithm that builds its head per episode (algorithm=protonet or "
                          "protomaml), or task.sampler=fixed")
    train_ways = getattr(task, "train_ways", None)
    if algorithm.one_output_per_way and train_ways is not None and train_ways != task.ways:
        raise ConfigError(f"task.train_ways={train_ways} differs from task.ways={task.ways}, but "
                          f"algorithm={choices.get('algorithm')} predicts with a head of one output per way: set "
                          "task.train_ways=null, or use a metric-based algorithm (algorithm=protonet)")


def serve_examples(algorithm: MetaAlgorithm, task: TaskFamily) -> int:
    """Have ``task`` serve a pre-training algorithm (``algorithm=finetune``: ``episodic`` false) mini-batches of its
    training split's labelled examples; return the number of training classes. Only a family of labelled examples
    (images, texts) has them."""
    if not isinstance(task, ClassificationFamily):
        name = HydraConfig.get().runtime.choices.get("algorithm") if HydraConfig.initialized() else "finetune"
        raise ConfigError(f"algorithm={name} pre-trains a classifier on the labelled examples of one family's "
                          f"training classes, and task {task.name} has none to serve: use an image or text family "
                          "(task=kanji, omniglot, mini_imagenet, folder, glyphs, wordnet, ...)")
    return task.serve_examples(Pretraining(algorithm.batch_size, algorithm.augment))


def check_distributed(trainer: pl.Trainer, task: TaskFamily, learner: MetaLearner) -> None:
    """With several processes, each adapts a share of the meta-batch and autograd all-reduces the
    meta-gradient: every process needs a task, and the outer step must be the optimiser's."""
    processes = trainer.world_size
    if processes == 1:
        return
    if not learner.algorithm.episodic:
        choices = HydraConfig.get().runtime.choices
        raise ConfigError(f"algorithm={choices.get('algorithm')} pre-trains on mini-batches of examples that every "
                          "process would draw alike (they are not split between processes): run it in one process "
                          "(hardware=cpu or gpu)")
    if task.meta_batch_size < processes:
        raise ConfigError(f"task.meta_batch_size={task.meta_batch_size} gives some of the {processes} processes of "
                          f"this run no task: make it at least {processes}")
    if not learner.automatic_optimization:
        choices = HydraConfig.get().runtime.choices
        raise ConfigError(f"algorithm={choices.get('algorithm')} takes its outer step itself, which DDP does not "
                          "all-reduce: run it in one process (hardware=cpu or gpu)")
