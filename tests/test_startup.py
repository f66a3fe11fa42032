"""What keeps a short job's start-up short (benchmarks/startup.py times it): behaviour, not timings."""

from __future__ import annotations

import copy
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore

from metalab.config import register_configs
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
