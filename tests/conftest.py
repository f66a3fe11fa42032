"""Shared helpers: compose the real config tree as `metalab-train` would, with a private MLflow store."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from metalab.config import config_dir, register_configs

BIN = Path(sys.executable).parent
register_configs()


def compose_job(output_dir: Path, overrides: list[str]) -> DictConfig:
    """The job config `metalab-train <overrides>` would run, with Hydra's runtime set as in a real job."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.name = "test"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture
def job(tmp_path: Path) -> Callable[..., DictConfig]:
    """``job(*overrides)``: a composed config tracking to ``tmp_path/mlflow.db``."""

    runs = itertools.count()

    def make(*overrides: str) -> DictConfig:
        store = [] if "tracking=none" in overrides else [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
        return compose_job(tmp_path / f"run{next(runs)}", [*store, *overrides])

    return make


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            module: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `metalab-train ARGS` (or `python -m metalab.train ARGS`) as a user would."""
    command = [sys.executable, "-m", "metalab.train"] if module else [str(BIN / "metalab-train")]
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")} | (env or {})
    return subprocess.run([*command, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def set_by_ci(variable: str, what: str, how_to_start: str) -> str:
    """The environment ``variable`` naming ``what`` .ci/run starts; CI must set it (a skip there would hide a broken
    service), elsewhere the test is skipped, saying ``how_to_start`` it."""
    value = os.environ.get(variable, "")
    if not value:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {variable} is unset: .ci/run starts {what} and exports it")
        pytest.skip(f"{what} is not set up here: {how_to_start}")
    return value


@pytest.fixture(scope="session")
def server() -> str:
    """The tracking server's URI (scripts/tracking_server.sh)."""
    uri = set_by_ci("METALAB_TEST_SERVER_URI", "the tracking server", "start one with `scripts/tracking_server.sh "
                    "start` and set METALAB_TEST_SERVER_URI to the URI it prints").rstrip("/")
    with urllib.request.urlopen(f"{uri}/health", timeout=10) as response:
        assert response.status == 200
    return uri


def experiment_name(kind: str) -> str:
    """A fresh experiment per test run, so reruns against a long-lived server never collide."""
    return f"metalab-test-{kind}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def kanji_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One render cache for the session's kanji runs."""
    return str(tmp_path_factory.mktemp("kanji-cache"))


# The suite must leave the checkout as it found it: every run, store and report goes to a temporary folder
# (a user's ./mlruns, ./mlflow.db, outputs/ and multirun/ sit in the same folder and must not gain test runs).
CHECKOUT = Path(__file__).resolve().parents[1]
UNTRACKED_BY_DESIGN = {".git", ".venv", ".cache", ".pytest_cache", ".ruff_cache", "__pycache__"}


def checkout_files() -> dict[str, tuple[int, int]]:
    """Every file of the checkout outside the environment and caches, with its size and modification time."""
    files = {}
    for folder, subfolders, names in os.walk(CHECKOUT):
        subfolders[:] = [name for name in subfolders if name not in UNTRACKED_BY_DESIGN]
        for name in names:
            path = Path(folder, name)
            stat = path.lstat()
            files[str(path.relative_to(CHECKOUT))] = (stat.st_size, stat.st_mtime_ns)
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_CHECKOUT_BEFORE] = checkout_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before, after = session.config.stash[_CHECKOUT_BEFORE], checkout_files()
    changed = sorted({path for path in before.keys() | after.keys() if before.get(path) != after.get(path)})
    if changed:
        print(f"\nthe tests changed the checkout ({len(changed)} files; they must write to temporary folders):",
              *changed[:20], sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_CHECKOUT_BEFORE = pytest.StashKey[dict[str, tuple[int, int]]]()
