"""Every option of the config tree composes, instantiates, and carries its generated schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from metalab.config import OBJECT_GROUPS, config_dir
from metalab.stats import mean_and_ci95

CONF = config_dir()
OPTIONS = [(group.name, option.stem) for group in sorted(CONF.iterdir()) if group.is_dir()
           for option in sorted(group.glob("*.yaml"))]


TASK_OF_MODEL = {"cnn4": "kanji", "resnet12": "kanji", "text_cnn": "wordnet", "transformer": "wordnet",
                 "gaussian_mlp": "pendulum"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(job, group: str, option: str) -> None:
    """Every option composes with the defaults (image models with an image task, text encoders with a text task)
    and its object builds."""
    task = TASK_OF_MODEL.get(option) if group == "model" else None
    cfg = job(f"{group}={option}", *([f"task={task}"] if task else []))
    for key in ("root", "path"):  # a task's data location (task=folder: root, task=text_jsonl: path)
        if group == "task" and key in cfg.task.keys():  # `in` is False for a missing (???) value
            cfg.task[key] = f"/data/{key}"
    if group in ("task", "model"):
        instantiate(cfg[group])


@pytest.mark.parametrize("group", OBJECT_GROUPS)
def test_object_options_declare_their_schema(group: str) -> None:
    for option in (CONF / group).glob("*.yaml"):
        spec = yaml.safe_load(option.read_text())
        assert spec["_target_"], option
        assert spec["defaults"][0] == f"{option.stem}_schema", f"{option} must start with its schema"


def test_schema_types_come_from_the_constructor(job) -> None:
    cfg = job("task.meta_batch_size=4")
    assert cfg.task.meta_batch_size == 4
    with pytest.raises(ConfigCompositionException) as error:
        job("task.meta_batch_size=four")
    assert "could not be converted to Integer" in str(error.value.__cause__)
    with pytest.raises(ConfigCompositionException) as error:
        job("task.shotz=4")
    assert "Key 'shotz' not in 'SinusoidRegressionConfig'" in str(error.value.__cause__)


def test_experiment_preset_overrides_the_defaults(job) -> None:
    cfg = job("debug=smoke")
    assert cfg.trainer.max_steps == 20 and cfg.task.test_tasks == 20


def test_mean_and_ci95_is_students_t_interval() -> None:
    import torch

    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, ci95 = mean_and_ci95(values)
    assert mean == pytest.approx(2.5)
    assert ci95 == pytest.approx(3.182446 * 1.2909944 / 2.0, rel=1e-6)  # t(0.975, 3) · s/√4, s = sqrt(5/3)


def test_no_group_is_empty() -> None:  # conf/hydra/ holds groups of Hydra's own (hydra/sweeper/...), no options
    assert all(any(group.rglob("*.yaml")) for group in Path(CONF).iterdir() if group.is_dir())
