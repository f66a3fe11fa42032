"""What keeps a short job's start-up short (benchmarks/startup.py times it): behaviour, not timings."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import make_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import metalab
from metalab import config, schema_cache
from metalab.config import OBJECT_GROUPS, config_dir, generate_schema, register_configs, schema_for
from metalab.schema_cache import SchemaCache, decode_schema, encode_schema, hash_sources, same_schema
from metalab.tracking.client import open_client

HEAVY = ("torch", "pytorch_lightning", "mlflow", "learn2learn")


def test_config_and_override_checks_import_no_heavy_package() -> None:
    # A fresh interpreter: this one has imported everything already.
    script = "import json, sys, metalab, metalab.config, metalab.overrides; print(json.dumps(list(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script],
                            capture_output=True, text=True, check=True)
    imported = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_copies_of_hydras_config_repository_share_the_config_store() -> None:
    register_configs()
    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store
    assert copy.deepcopy({"source": store})["source"] is store  # as inside Hydra's repository


def dump(database: Path) -> list[str]:
    """The database's schema and rows without the Default experiment's creation time, in an order that does not
    depend on MLflow's migrations (two runs of them list a table's constraints in different orders)."""
    statements = (re.sub(r"'Default','([^']*)','active',\d+,\d+", r"'Default','\1','active',T,T", statement)
                  for statement in sqlite3.connect(database).iterdump())
    return sorted("\n".join(sorted(statement.split("\n"))) for statement in statements)


def test_a_new_store_is_a_copy_of_the_template_and_matches_the_one_mlflow_makes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the Default experiment's artifact folder is ./mlruns: the same for both
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))  # no template: MLflow migrates the store
    (tmp_path / "migrated").mkdir()
    open_client("sqlite:///migrated/mlflow.db").search_experiments()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("first", "second"):  # the first makes the template, the second only copies it
        (tmp_path / name).mkdir()
        open_client(f"sqlite:///{name}/mlflow.db").search_experiments()
    [template] = (tmp_path / "cache" / "metalab").glob("mlflow-*-empty.db")
    assert [name for (name,) in sqlite3.connect(template).execute("SELECT name FROM experiments")] == []
    assert dump(tmp_path / "first" / "mlflow.db") == dump(tmp_path / "migrated" / "mlflow.db")
    assert dump(tmp_path / "second" / "mlflow.db") == dump(tmp_path / "migrated" / "mlflow.db")


def test_an_existing_store_is_never_replaced_by_the_template(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    client = open_client(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_experiment("kept")
    open_client(f"sqlite:///{tmp_path}/mlflow.db")
    assert [name for (name,) in sqlite3.connect(tmp_path / "mlflow.db").execute("SELECT name FROM experiments")] == [
        "Default", "kept"]


# ---------------------------------------------------------------------------------------------------------------
# The schema cache: composing a config (--help, --cfg job, the override check) imports no target.

# A fresh interpreter running metalab-train, which writes the top-level packages it imported to $MODULES_FILE.
ENTRY_POINT = ("import atexit, json, os, sys; atexit.register(lambda: open(os.environ['MODULES_FILE'], 'w').write("
               "json.dumps(sorted({name.split('.')[0] for name in sys.modules})))); "
               "from metalab.train import cli; cli()")


def metalab_train(args: list[str], cwd: Path, cache_home: Path | str) -> tuple[subprocess.CompletedProcess[str], set]:
    """``metalab-train ARGS`` in a fresh interpreter with its cache in ``cache_home``; and the packages it imported."""
    modules = cwd / "modules.json"
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    result = subprocess.run([sys.executable, "-c", ENTRY_POINT, *args], cwd=cwd, capture_output=True, text=True,
                            env=env | {"XDG_CACHE_HOME": str(cache_home), "MODULES_FILE": str(modules)}, timeout=600)
    return result, set(json.loads(modules.read_text()))


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $XDG_CACHE_HOME holding the schemas of the config tree (written here, where the targets are
    imported already: fast), and a process-wide cache that reads it."""
    home = tmp_path / "cache-home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setattr(config, "_SCHEMAS", None)
    register_configs()
    assert list((home / "metalab").glob("schemas-*.json"))
    return home


def object_targets() -> list[tuple[str, tuple[str, ...]]]:
    """Every target the config tree generates a schema for: each option of the object groups, learner, runner."""
    targets = [("metalab.learner.MetaLearner", ("optimizer", "problem", "runner", "scheduler")),
               ("metalab.runner.TaskRunner", ())]
    for group in OBJECT_GROUPS:
        for option in sorted((config_dir() / group).glob("*.yaml")):
            targets.append((yaml.safe_load(option.read_text())["_target_"], ()))
    return targets


def refuse_to_generate(target: str, injected: tuple[str, ...]) -> tuple[type, set[str]]:
    raise AssertionError(f"{target} was generated, not read from the cache")


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job", "algorithm=reptile", "task=kanji"]])
def test_composing_a_config_imports_no_heavy_package_once_the_cache_exists(tmp_path: Path, cache_home: Path,
                                                                          args: list[str]) -> None:
    result, imported = metalab_train(args, tmp_path, cache_home)
    assert result.returncode == 0, result.stderr
    assert "inner_lr: " in result.stdout  # the composed config, printed
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_a_bad_value_is_still_one_line_naming_the_field_with_the_cache(tmp_path: Path, cache_home: Path) -> None:
    result, imported = metalab_train(["algorithm.inner_lr=abc"], tmp_path, cache_home)
    assert result.returncode == 2
    assert result.stderr.strip() == ("metalab: error: bad value for 'algorithm.inner_lr': Value 'abc' of type 'str' "
                                     "could not be converted to Float"), result.stderr
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))  # refused before any job is imported


def test_schemas_rebuilt_from_the_cache_equal_the_generated_ones(cache_home: Path) -> None:
    [path] = (cache_home / "metalab").glob("schemas-*.json")
    cached = SchemaCache(refuse_to_generate, path=path)
    for target, injected in object_targets():
        generated, rebuilt = schema_for(target, injected), cached.get(target, injected)
        assert rebuilt is not generated and rebuilt.__name__ == generated.__name__
        assert [(item.name, item.type) for item in dataclasses.fields(rebuilt)] == [
            (item.name, item.type) for item in dataclasses.fields(generated)], target
        for new, old in zip(dataclasses.fields(rebuilt), dataclasses.fields(generated), strict=True):
            assert (new.default_factory is dataclasses.MISSING) == (old.default_factory is dataclasses.MISSING)
            value = new.default_factory() if new.default_factory is not dataclasses.MISSING else new.default
            expected = old.default_factory() if old.default_factory is not dataclasses.MISSING else old.default
            assert (type(value), value) == (type(expected), expected), f"{target}.{new.name}"
        assert OmegaConf.to_yaml(OmegaConf.structured(rebuilt)) == OmegaConf.to_yaml(OmegaConf.structured(generated))


def test_every_type_and_default_the_generator_can_give_survives_the_file(tmp_path: Path) -> None:
    """Beyond the current targets' (int, float, str, bool, list[int], int | None, str | None): an Enum, Any, dicts."""
    schema = make_dataclass("WideConfig", [
        ("_target_", str, dataclasses.field(default="somewhere.Wide")), ("size", int, dataclasses.field(default=3)),
        ("rate", float, dataclasses.field(default=float("inf"))), ("flag", bool, dataclasses.field(default=True)),
        ("anything", Any, dataclasses.field(default=None)), ("maybe", Any | None, dataclasses.field(default=None)),
        ("colour", Colour, dataclasses.field(default=Colour.RED)),
        ("shade", Colour | None, dataclasses.field(default=None)),
        ("table", dict[str, list[float]] | None, dataclasses.field(default_factory=lambda: {"a": [1.0]})),
        ("names", list[str], dataclasses.field(default_factory=lambda: ["x"])),
        ("required", str, dataclasses.field(default="???"))])
    rebuilt = decode_schema(json.loads(json.dumps(encode_schema(schema))))
    assert same_schema(rebuilt, schema)
    assert dataclasses.fields(rebuilt)[6].type is Colour and dataclasses.fields(rebuilt)[6].default is Colour.RED


class Colour(enum.Enum):
    RED = 1
    BLUE = 2


USER_PACKAGE = '''
class Thing:
    def __init__(self, size: int = {size}, name: str = "thing") -> None:
        self.size, self.name = size, name
'''


def test_a_changed_source_file_of_a_users_package_invalidates_its_entry(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text(USER_PACKAGE.format(size=1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    path = tmp_path / "cache" / "schemas.json"
    generated: list[str] = []

    def generate(target: str, injected: tuple[str, ...]) -> tuple[type, set[str]]:
        generated.append(target)
        return generate_schema(target, injected)

    def size_default() -> int:
        cache = SchemaCache(generate, path=path, key="k")
        default = next(item.default for item in dataclasses.fields(cache.get("userpkg.Thing")) if item.name == "size")
        cache.save()
        return default

    assert size_default() == 1 and generated == ["userpkg.Thing"]
    entry = json.loads(path.read_text())["schemas"]["userpkg.Thing"]
    assert set(entry["sources"]) == {"userpkg"} and "sources" in entry["sources"]["userpkg"]  # hashed: not installed
    assert size_default() == 1 and generated == ["userpkg.Thing"]  # from the file
    (tmp_path / "userpkg" / "__init__.py").write_text(USER_PACKAGE.format(size=22))
    monkeypatch.delitem(sys.modules, "userpkg")  # (this process imported the old code)
    assert size_default() == 22 and generated == ["userpkg.Thing"] * 2
    assert size_default() == 22 and generated == ["userpkg.Thing"] * 2


def test_another_version_of_an_installed_dependency_invalidates_its_entries(cache_home: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """MAML's schema is read from classes of torch (its injected ``model: nn.Module``): torch's version counts."""
    [path] = (cache_home / "metalab").glob("schemas-*.json")
    assert json.loads(path.read_text())["schemas"]["metalab.algorithms.MAML"]["sources"] == {
        "torch": {"distributions": {"torch": metadata.version("torch")}}}
    SchemaCache(refuse_to_generate, path=path).get("metalab.algorithms.MAML")
    version = metadata.version
    monkeypatch.setattr(schema_cache.metadata, "version", lambda name: "0.0" if name == "torch" else version(name))
    generated: list[str] = []
    cache = SchemaCache(lambda target, injected: generated.append(target) or generate_schema(target, injected),
                        path=path)
    cache.get("metalab.algorithms.MAML")
    cache.get("metalab.models.MLP")  # read from metalab's classes alone: still current
    assert generated == ["metalab.algorithms.MAML"]


def test_a_change_of_metalabs_sources_makes_another_file(tmp_path: Path) -> None:
    copy_of_metalab = tmp_path / "metalab"
    shutil.copytree(Path(metalab.__file__).parent, copy_of_metalab, ignore=shutil.ignore_patterns("__pycache__"))
    before = hash_sources([copy_of_metalab])
    assert hash_sources([copy_of_metalab]) == before
    learner = copy_of_metalab / "learner.py"
    learner.write_text(learner.read_text() + "# an edit\n")
    assert hash_sources([copy_of_metalab]) != before
    (copy_of_metalab / "new_module.py").write_text("")
    assert len({before, hash_sources([copy_of_metalab])}) == 2
    # A file written under another key (metalab's sources then) is not read.
    path = tmp_path / "schemas.json"
    old = SchemaCache(generate_schema, path=path, key="before")
    old.get("metalab.runner.TaskRunner")
    old.save()
    assert SchemaCache(refuse_to_generate, path=path, key="before").entries
    assert SchemaCache(generate_schema, path=path, key="after").entries == {}


@pytest.mark.parametrize("content", ["{not json", '{"key": "k", "schemas": {"metalab.runner.TaskRunner": 7}}',
                                     '{"key": "k", "schemas": {"metalab.runner.TaskRunner": {"sources": {}, '
                                     '"schema": {"name": "X", "fields": [{"name": "a", "type": "complex"}]}}}}'])
def test_an_unreadable_file_is_regenerated_silently(tmp_path: Path, content: str) -> None:
    path = tmp_path / "schemas.json"
    path.write_text(content)
    cache = SchemaCache(generate_schema, path=path, key="k")
    assert same_schema(cache.get("metalab.runner.TaskRunner"), schema_for("metalab.runner.TaskRunner"))
    cache.save()
    assert SchemaCache(refuse_to_generate, path=path, key="k").get("metalab.runner.TaskRunner")


def test_a_cache_that_cannot_be_written_fails_nothing(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    cache = SchemaCache(generate_schema, path=tmp_path / "a-file" / "metalab" / "schemas.json", key="k")
    cache.get("metalab.runner.TaskRunner")
    cache.save()  # no folder can be made under a file (as under a read-only home): skipped
    assert not list(tmp_path.glob(".*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_cache_folder_fails_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "metalab"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        cache = SchemaCache(generate_schema, path=folder / "schemas.json", key="k")
        cache.get("metalab.runner.TaskRunner")
        cache.save()
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_help_works_where_the_cache_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    result, _ = metalab_train(["--help"], tmp_path, tmp_path / "not-a-folder")
    assert result.returncode == 0, result.stderr  # (matplotlib, imported to generate the schemas, warns)
    assert "metalab: error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("metalab-train: ") and "inner_lr: 0.01" in result.stdout


def test_lightning_logs_plain_lines_when_imported_after_hydra_set_up_logging() -> None:
    """The job imports Lightning once Hydra has configured the root logger; its lines stay as without Hydra."""
    script = ("import logging; logging.basicConfig(format='[%(name)s][%(levelname)s] - %(message)s'); "
              "from metalab._quiet import plain_lightning_logs; plain_lightning_logs(); "
              "from pytorch_lightning.utilities.rank_zero import rank_zero_info; rank_zero_info('a line')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stderr == "a line\n", result.stderr
