"""Every command README.md and docs/ show (each ``metalab-train``, ``metalab`` and ``make`` line of a code
block) runs here as printed, shortened only by added overrides (fewer steps and tasks), or with ``--cfg job``
where it needs data or hardware CI lacks. A command added to the Markdown without an entry in ``CHECKS``
fails ``test_every_documented_command_has_a_check``.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(metalab-train|metalab|make)(\s|$)")

SHORT = ("trainer.max_steps=3", "task.val_tasks=2", "task.test_tasks=2")
SHORT_IMAGES = (*SHORT, "task.meta_batch_size=2", "runner.backend=loop")  # no auto probe: it times CNN4 twice
SHORT_TEXTS = SHORT_IMAGES
SHORT_RL = (*SHORT, "task.meta_batch_size=2", "algorithm.inner_rollouts=2")


def documented_commands() -> dict[str, str]:
    """Each command line of the documents' code blocks (comments dropped) → the document it is in."""
    commands = {}
    for document in DOCUMENTS:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", document.read_text(), re.S | re.M):
            for line in block.splitlines():
                command = line.split(" # ", 1)[0].strip()
                if COMMAND.match(command):
                    commands.setdefault(command, document.name)
    return commands


@dataclass(frozen=True)
class Check:
    """How a documented command is run here.

    how: ``run`` (as printed + ``extra``), ``cfg`` (as printed + ``--cfg job``; a sweep's first job, since Hydra
    cannot combine ``--cfg`` with ``-m``), ``serve`` (started, answered over HTTP, stopped), ``dry`` (``make -n``:
    the target would run the suite itself), ``ci`` (what ``.ci/run`` runs).
    """

    how: str = "run"
    extra: tuple[str, ...] = ()
    runs: int = 0  # FINISHED runs the store must hold afterwards (0: none required)
    failed: int = 0  # FAILED runs it must hold
    shows: str = ""  # text the output must contain
    before: tuple[str, ...] = ()  # documented commands run first in the same folder (e.g. a sweep to compare)
    exit_status: int = 0
    slow: bool = False
    timeout_s: int = 900  # the command's own limit (every preset's smoke run in turn takes ~10 min on 2 cores)


CHECKS: dict[str, Check] = {
    "make demo": Check(extra=(f"ARGS={' '.join(SHORT)}",), runs=1, shows="post-adaptation MSE"),
    "make test": Check("ci"),
    "make ui": Check("serve"),
    "metalab-train algorithm.inner_lr=0.05 task.shots=5 trainer.max_steps=2000": Check(extra=SHORT, runs=1),
    "metalab-train algorithm=fomaml seed=3": Check(extra=SHORT, runs=1),
    "metalab-train debug=smoke": Check(runs=1),
    "metalab-train tracking=none": Check(extra=SHORT, shows="meta-test over 2 tasks"),
    "metalab-train --cfg job": Check(shows="inner_lr: 0.01"),
    "metalab-train -m algorithm=maml,fomaml seed=0,1,2": Check(extra=SHORT, runs=7, slow=True),  # 6 jobs + sweep
    "metalab-train -m algorithm=maml,protonet task=kanji task.shots=1,5 seed=0,1,2":
        Check(extra=SHORT_IMAGES, runs=13, slow=True),
    "metalab-train -m algorithm=maml,fomaml seed=0,1 hydra/launcher=joblib hydra.launcher.n_jobs=2":
        Check(extra=SHORT, runs=5, slow=True),
    "metalab-train -m hardware=slurm hydra.launcher.partition=gpu seed=0,1,2":
        Check("cfg", shows="accelerator: gpu"),
    "metalab-train hparams_search=maml_optuna hydra.sweeper.n_trials=30":
        Check(extra=(*SHORT, "hydra.sweeper.n_trials=2"), runs=3, slow=True),
    "metalab-train hparams_search=maml_optuna hydra.sweeper.storage=sqlite:///study.db hydra.sweeper.study_name=lr":
        Check(extra=(*SHORT, "hydra.sweeper.n_trials=2"), runs=3, shows="(created by this worker)"),
    "metalab compare --sweep last": Check(before=("metalab-train -m algorithm=maml,fomaml seed=0,1,2",),
                                          runs=7, shows="| maml |", slow=True),
    "metalab-train hardware=ddp task=omniglot task.meta_batch_size=32": Check("cfg", shows="strategy: ddp"),
    "metalab-train hardware=ddp_cpu": Check(extra=SHORT, runs=1, slow=True),
    "metalab-train task=kanji algorithm=protonet": Check(extra=SHORT_IMAGES, runs=1),
    "metalab-train task=kanji algorithm=protonet task.sampler=meta_dataset": Check(extra=SHORT_IMAGES, runs=1),
    "metalab-train task=multi_source algorithm=protonet 'task.sources=[kanji,glyphs]'":
        Check(extra=(*SHORT_IMAGES, "task.meta_dataset={max_ways: 10, max_support: 50}"), runs=1,
              shows="post-adaptation accuracy"),
    "metalab compare --experiment multi_source --columns source":
        Check(before=("metalab-train task=multi_source algorithm=protonet 'task.sources=[kanji,glyphs]'",), runs=1,
              shows="| algorithm \\ source | glyphs | kanji | avg rank |"),
    "metalab-train task=meta_dataset task.root=/data/meta-dataset algorithm=protonet":
        Check("cfg", shows="test_only:\n  - traffic_sign\n  - mscoco"),
    "metalab-train task=kanji algorithm=maml algorithm.inner_lr=0.4 task.ways=20 task.shots=5":
        Check(extra=SHORT_IMAGES, runs=1, slow=True),
    "metalab-train task=omniglot task.root=/data/omniglot": Check("cfg", shows="root: /data/omniglot"),
    "metalab-train task=pendulum algorithm=maml_trpo": Check(extra=SHORT_RL, runs=1, shows="post-adaptation return"),
    "metalab-train task=nav2d algorithm=maml_trpo learner.test_curve_steps=3":
        Check(extra=SHORT_RL, runs=1, shows="after 3 inner steps"),
    "metalab-train task=kanji algorithm=finetune": Check(extra=SHORT_IMAGES, runs=1, shows="post-adaptation accuracy"),
    "metalab-train task=kanji algorithm=finetune algorithm.pretrain_head=cosine algorithm.head=cosine":
        Check(extra=SHORT_IMAGES, runs=1, shows="pre-training steps"),
    "metalab-train task=wordnet algorithm=finetune algorithm.head=linear":
        Check(extra=(*SHORT_TEXTS, "algorithm.batch_size=16"), runs=1, slow=True),
    "metalab reproduce finetune_kanji_5w1s": Check(extra=("--budget", "smoke"), runs=1, shows="plumbing ok",
                                                    slow=True),
    "metalab-train task=cheetah_vel algorithm=maml_trpo":
        Check(extra=(*SHORT_RL, "task.horizon=20"), runs=1, shows="post-adaptation return"),
    # Two processes' start-ups each (~30 s): in `make test` tests/test_reproduce.py and test_meta_rl.py run the same
    # judging and comparing in-process.
    "metalab reproduce maml_trpo_cheetah_dir --budget smoke":
        Check(runs=1, shows="| maml_trpo_cheetah_dir/pre_return |", slow=True),
    "metalab compare --metric meta_test/post_return":
        Check(before=("metalab-train task=nav2d algorithm=maml_trpo learner.test_curve_steps=3",), runs=1,
              shows="meta_test/post_return: mean ± 95% CI", slow=True),
    "metalab-train task=wordnet algorithm=protonet": Check(extra=SHORT_TEXTS, runs=1, shows="post-adaptation accuracy"),
    "metalab-train task=wordnet algorithm=fomaml algorithm.inner_lr=0.4 algorithm.inner_steps=5 model=transformer":
        Check(extra=SHORT_TEXTS, runs=1, slow=True),
    "metalab-train task=text_jsonl task.dataset=huffpost task.path=/data/bao2020/huffpost.json algorithm=protonet "
    "task.shots=5": Check("cfg", shows="path: /data/bao2020/huffpost.json"),
    "metalab-train task=fewrel task.root=/data/fewrel algorithm=protonet": Check("cfg", shows="root: /data/fewrel"),
    "metalab-train task=mini_imagenet task.root=/data/mini-imagenet model.hidden_size=32":
        Check("cfg", shows="hidden_size: 32"),
    "metalab-train experiment=maml_omniglot_5w1s task.root=/data/omniglot": Check("cfg", shows="split: maml"),
    "metalab-train task=meta_dataset_source task.root=/data/meta-dataset task.source=omniglot algorithm=protonet":
        Check("cfg", shows="source: omniglot"),
    # Without the data set (as on CI) it must say so in one line, and exit 1.
    # (slow: ~14 s each, two processes; tests/test_reproduce.py's missing-data test runs the same path in make test)
    "metalab reproduce maml_omniglot_5w1s task.root=/data/omniglot":
        Check(exit_status=1, shows="not found under task.root=/data/omniglot", slow=True),
    "metalab reproduce protonet_metadataset_all task.root=/data/meta-dataset":
        Check(exit_status=1, shows="no training source of task=meta_dataset has its data under "
                                   "task.root=/data/meta-dataset", slow=True),
    "metalab reproduce maml_kanji_5w1s": Check(extra=("--budget", "smoke"), runs=1, shows="plumbing ok", slow=True),
    # Without Omniglot, the MAML++ ablation sweep's 7 jobs are FAILED runs (a failing sweep job gets one).
    "metalab reproduce all --budget smoke": Check(shows="| maml_kanji_5w1s |", failed=7, slow=True, timeout_s=1800),
    "metalab reproduce all --from-mlflow --out table.md": Check(shows="| maml_omniglot_5w1s |", slow=True),
    "metalab runs --stale": Check(before=("metalab-train debug=smoke",), runs=1, shows="no stale runs"),
    "metalab-train task=kanji algorithm=maml tracking.register_as=kanji-maml": Check(extra=SHORT_IMAGES, runs=1),
    # As printed, with no folders of images here: the one line of a missing support folder (test_serving.py adapts).
    "metalab adapt models:/kanji-maml/1 --support my_support --query my_queries":
        Check(exit_status=3, shows="--support my_support is not a folder"),
    "metalab compare --experiment kanji --register kanji-best":
        Check(before=("metalab-train task=kanji algorithm=maml tracking.register_as=kanji-maml",), runs=1,
              shows="registered as models:/kanji-best/1", slow=True),
    "make lint": Check(shows="All checks passed"),
    "make test-slow": Check("dry", shows="pytest -m slow"),
    "make test-all": Check("dry", shows="pytest"),
    "metalab-train algorithm=maml task=kanji runner.backend=auto": Check(extra=SHORT_IMAGES[:-1], runs=1, slow=True),
}


def test_every_documented_command_has_a_check() -> None:
    documented = documented_commands()
    missing = [f"{command}  ({document})" for command, document in documented.items() if command not in CHECKS]
    assert not missing, "commands shown in the docs without a check here (add each to CHECKS):\n" + "\n".join(missing)
    stale = [command for command in CHECKS if command not in documented]
    assert not stale, f"checks of commands the docs no longer show (remove them): {stale}"


def argv(command: str, how: str) -> list[str]:
    """The command line to run: the documented words with metalab's and make's paths made explicit."""
    words = shlex.split(command)
    program, args = words[0], words[1:]
    if program == "make":
        return ["make", "-f", str(ROOT / "Makefile"), *(["-n"] if how == "dry" else []), *args]
    if how == "cfg":  # --cfg shows one job: the first value of each swept key
        args = [arg.split(",")[0] if "=" in arg else arg for arg in args if arg not in ("-m", "--multirun")]
        args += ["--cfg", "job"]
    return [str(BIN / program), *args]


def environment(folder: Path, kanji_home: Path) -> dict[str, str]:
    """A user's shell in ``folder``: no tracking URI or data roots set, the shared kanji render cache."""
    unset = ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR", "OMNIGLOT_ROOT", "MINI_IMAGENET_ROOT", "META_DATASET_ROOT")
    return {key: value for key, value in os.environ.items() if key not in unset} | {
        "XDG_CACHE_HOME": str(kanji_home), "PATH": f"{BIN}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def kanji_home(kanji_cache: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$XDG_CACHE_HOME`` whose ``metalab/`` is the session's kanji render cache (rendered once)."""
    home = tmp_path_factory.mktemp("xdg-cache")
    (home / "metalab").symlink_to(kanji_cache)
    return home


def runs_by_status(store: Path) -> dict[str, int]:
    if not store.exists():
        return {}
    with sqlite3.connect(store) as db:
        return dict(db.execute("select status, count(*) from runs group by status").fetchall())


def serve(command: list[str], folder: Path, env: dict[str, str]) -> None:
    """Start ``make ui`` on a free port, wait for MLflow's /health, stop it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*command, f"PORT={port}"], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.read().decode().strip() == "OK"
                    return
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "make ui did not answer within 60 s"
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


# `make test` runs the documented commands that train nothing (`--cfg job`, one-line errors, make's targets) and the
# two a newcomer runs first; the other training runs are in `make test-slow` (.ci/run runs both). Each capability
# they show keeps a short real run of its own in `make test` (tests/test_<capability>.py, in-process).
FIRST_COMMANDS = ("make demo", "metalab-train debug=smoke")


def trains(command: str) -> bool:
    check = CHECKS[command]
    return bool(check.before) or (check.how == "run" and not check.exit_status and not command.startswith("make "))


def params(command: str) -> list:
    slow = CHECKS[command].slow or (trains(command) and command not in FIRST_COMMANDS)
    return [pytest.param(command, marks=[pytest.mark.slow] if slow else [], id=command)]


@pytest.mark.parametrize("command", [p for command in CHECKS for p in params(command)])
def test_documented_command_runs_as_printed(command: str, tmp_path: Path, kanji_home: Path) -> None:
    check = CHECKS[command]
    env = environment(tmp_path, kanji_home)
    if check.how == "ci":
        assert command in (ROOT / ".ci" / "run").read_text().splitlines(), f"{command} is not what .ci/run runs"
        return
    if check.how == "serve":
        serve(argv(command, "run"), tmp_path, env)
        return
    for earlier in check.before:
        prior = subprocess.run([*argv(earlier, "run"), *check.extra, *CHECKS[earlier].extra], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=900)
        assert prior.returncode == 0, prior.stderr
    result = subprocess.run([*argv(command, check.how), *check.extra], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=check.timeout_s)
    output = result.stdout + result.stderr
    assert result.returncode == check.exit_status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert check.shows in output, output[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]  # no third-party warning on a correct run
    statuses = runs_by_status(tmp_path / "mlflow.db")
    assert statuses.get("RUNNING", 0) == 0, statuses  # every run (and sweep) ended
    assert statuses.get("FAILED", 0) == check.failed, statuses
    if check.runs:
        assert statuses.get("FINISHED", 0) == check.runs, statuses
    if check.exit_status:
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
