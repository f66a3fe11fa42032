"""Schema generation: every constructor argument becomes a typed field, or schema_for says why it cannot."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from torch import nn

from metalab.config import config_dir, schema_for
from metalab.overrides import check_overrides
from metalab.tasks import ImageClassFamily, TaskFamily

TASKS = sorted((config_dir() / "task").glob("*.yaml"))


class Expressible:
    def __init__(self, *, sizes: dict[str, int], extra: dict | None = None, root: Path = Path("data"),
                 scale: int | float = 2, widths: tuple[int, ...] = (40, 40), names: list[str] | None = None,
                 channels: Literal[1, 3] = 1, cache: str | Path | None = None) -> None:
        self.sizes, self.extra, self.root, self.scale = sizes, extra, Path(root), scale
        self.widths, self.names, self.channels, self.cache = widths, names, channels, cache


def fields_of(schema: type) -> dict[str, dataclasses.Field]:
    return {item.name: item for item in dataclasses.fields(schema)}


def test_dict_path_and_int_or_float_get_typed_fields() -> None:
    fields = fields_of(schema_for(f"{__name__}.Expressible"))
    assert {name: item.type for name, item in fields.items()} == {
        "_target_": str, "sizes": dict[str, int], "extra": dict[str, Any] | None, "root": str, "scale": float,
        "widths": list[int], "names": list[str] | None, "channels": int, "cache": str | None}
    assert fields["root"].default == "data"  # a Path default is written as the string YAML holds


def test_generated_schema_composes_validates_and_builds() -> None:
    schema = OmegaConf.structured(schema_for(f"{__name__}.Expressible"))
    cfg = OmegaConf.merge(schema, {"sizes": {"a": 1}, "extra": {"k": [1, "x"]}, "root": "/data/x", "scale": 3})
    built = instantiate(cfg)
    assert built.sizes == {"a": 1} and built.extra == {"k": [1, "x"]}
    assert built.root == Path("/data/x") and built.scale == 3.0 and list(built.widths) == [40, 40]
    for bad in ({"sizes": {"a": "many"}}, {"scale": "big"}, {"widths": ["wide"]}, {"channels": "rgb"}):
        with pytest.raises(ValidationError):
            OmegaConf.merge(schema, bad)


class Foo:
    pass


class TakesFoo:
    def __init__(self, foo: Foo) -> None:
        self.foo = foo


class TakesDictOfFoo:
    def __init__(self, table: dict[str, Foo] | None = None) -> None:
        self.table = table


class TakesIntOrStr:
    def __init__(self, size: int | str = 1) -> None:
        self.size = size


class TakesIntKeys:
    def __init__(self, table: dict[int, float]) -> None:
        self.table = table


class Unannotated:
    def __init__(self, size=1) -> None:
        self.size = size


@pytest.mark.parametrize(("cls", "message"), [
    (TakesFoo, "TakesFoo(foo: Foo): schema generation cannot express Foo"),
    (TakesDictOfFoo, "TakesDictOfFoo(table: dict[str, Foo] | None): schema generation cannot express "
                     "dict[str, Foo] | None"),
    (TakesIntOrStr, "TakesIntOrStr(size: int | str): schema generation cannot express int | str (OmegaConf's only "
                    "unions are Optional"),
    (TakesIntKeys, "TakesIntKeys(table: dict[int, float]): schema generation cannot express dict[int, float] "
                   "(config keys are strings: use dict[str, ...])"),
    (Unannotated, "Unannotated(size) [declared in Unannotated] has no annotation"),
])
def test_an_inexpressible_argument_fails_at_schema_generation(cls: type, message: str) -> None:
    with pytest.raises(TypeError) as error:
        schema_for(f"{__name__}.{cls.__name__}")
    assert f"{__name__}.{message}" in str(error.value)
    assert "annotate it with" in str(error.value)


class TakesModel:
    def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
        self.model, self.lr = model, lr


def test_an_injected_model_gets_no_field() -> None:
    """train.py passes the network in at instantiate: it is no config value, and no error."""
    assert list(fields_of(schema_for(f"{__name__}.TakesModel"))) == ["_target_", "lr"]


class Base:
    def __init__(self, *, size: int, rate: float = 0.5, name: str = "base") -> None:
        self.size, self.rate, self.name = size, rate, name


class Middle(Base):
    def __init__(self, *, depth: int = 3, name: str = "middle", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.depth = depth


class Leaf(Middle):
    def __init__(self, *, colour: str = "red", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.colour = colour


class BadBase:
    def __init__(self, foo: Foo | None = None) -> None:
        self.foo = foo


class ForwardsToBadBase(BadBase):
    def __init__(self, size: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size


def test_kwargs_bring_in_the_base_arguments_with_their_defaults() -> None:
    fields = fields_of(schema_for(f"{__name__}.Leaf"))
    assert list(fields) == ["_target_", "colour", "depth", "name", "size", "rate"]  # own first, then up the MRO
    assert fields["name"].default == "middle"  # the nearest constructor's default wins
    assert fields["rate"].type is float and fields["rate"].default == 0.5
    assert fields["size"].default == "???"  # required in Base, so required in Leaf
    built = instantiate(OmegaConf.merge(OmegaConf.structured(schema_for(f"{__name__}.Leaf")), {"size": 2}))
    assert (built.colour, built.depth, built.name, built.size, built.rate) == ("red", 3, "middle", 2, 0.5)


def test_an_inexpressible_base_argument_names_where_it_comes_from() -> None:
    with pytest.raises(TypeError, match=r"ForwardsToBadBase\(foo: Foo \| None\) \[from .*BadBase through \*\*kwargs\]"):
        schema_for(f"{__name__}.ForwardsToBadBase")


def named_arguments(cls: type) -> set[str]:
    return {name for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)}


@pytest.mark.parametrize("option", TASKS, ids=[path.stem for path in TASKS])
def test_every_task_schema_has_its_base_classes_arguments(option: Path) -> None:
    spec = yaml.safe_load(option.read_text())
    cls = get_object(spec["_target_"])
    fields = set(fields_of(schema_for(spec["_target_"]))) - {"_target_"}
    for base in (TaskFamily, ImageClassFamily):
        if issubclass(cls, base):
            assert named_arguments(base) <= fields, f"{option.name} lacks {named_arguments(base) - fields}"
    # The inherited defaults are generic (MAML's sinusoid settings): a task's YAML states each of its values, or its
    # defaults list places a config there (task=multi_source's catalogue: `/task@catalogue.kanji: kanji`).
    placed = {next(iter(entry)).split("@")[1].split(".")[0] for entry in spec["defaults"]
              if isinstance(entry, dict) and "@" in next(iter(entry)) and "_global_" not in next(iter(entry))}
    assert set(spec) - {"defaults", "_target_"} | placed == fields, option.name


def test_an_inherited_key_gets_did_you_mean_and_type_checks(job) -> None:
    assert "did you mean 'task.meta_batch_size'?" in check_overrides(["task=kanji", "task.meta_bach_size=4"])
    assert job("task=kanji", "task.meta_batch_size=4").task.meta_batch_size == 4
    with pytest.raises(ConfigCompositionException) as error:
        job("task=kanji", "task.meta_batch_size=four")
    assert "could not be converted to Integer" in str(error.value.__cause__)
