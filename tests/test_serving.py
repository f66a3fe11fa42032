"""A run's learner as an MLflow Model: loaded, registered, served over HTTP and used by `metalab adapt`, it answers a
few-shot problem exactly as the run's own test step did on the same task."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from PIL import Image

from metalab import cli
from metalab.errors import DATA_MISSING_EXIT_CODE, ConfigError
from metalab.job import train
from metalab.learner import MetaLearner
from metalab.serving.problem import ProblemSpec, problem_frame
from metalab.tasks.episodes import Episodes, Task
from tests.conftest import BIN, compose_job
from tests.test_algorithms import ALGORITHMS

TINY_KANJI = ("task=kanji", "task.num_classes=150", "task.max_alphabet_size=20", "model.hidden_size=8", "debug=smoke",
              "trainer.max_steps=2", "trainer.val_check_interval=2", "task.val_tasks=2", "task.test_tasks=2",
              "task.eval_batch_size=2", "task.queries=3", "task.meta_batch_size=2",
              "runner.backend=loop")  # the backend the served model adapts with: the test step's, so bit for bit


@dataclass
class Run:
    """A finished tiny run, and what its test step computed on its first test task."""

    uri: str  # the tracking store
    run_id: str
    output_dir: Path
    task: Task
    predictions: torch.Tensor  # the test step's query outputs for ``task`` (Q, N)
    learner: MetaLearner


def tiny_run(folder: Path, *overrides: str) -> Run:
    """Train and test with ``overrides`` into ``folder/mlflow.db``, keeping the test step's first task and answer."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    seen: list[tuple[MetaLearner, Episodes, list[torch.Tensor]]] = []
    evaluate = MetaLearner._evaluate

    def spy(self: MetaLearner, tasks: Episodes) -> list[torch.Tensor]:
        predictions = evaluate(self, tasks)
        if self.trainer.testing:
            seen.append((self, tasks, predictions))
        return predictions

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MetaLearner, "_evaluate", spy)
        train(compose_job(folder / "job", [f"tracking.tracking_uri={uri}", *overrides]))
    learner, tasks, predictions = seen[0]
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(tasks_experiment(overrides))
                                           .experiment_id])
    return Run(uri, run.info.run_id, folder / "job", tasks[0], predictions[0], learner)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tasks_experiment(overrides: tuple[str, ...]) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "sinusoid")


def spec_of(model: mlflow.pyfunc.PyFuncModel) -> ProblemSpec:
    return model.unwrap_python_model().spec


def assert_answers(answers: pd.DataFrame, predictions: torch.Tensor) -> None:
    """The answer table holds exactly the test step's outputs (float32, bit for bit) and their argmax."""
    if "logits" in answers:
        assert np.array_equal(np.stack(answers["logits"]).astype(np.float32), predictions.numpy())
        assert answers["label"].tolist() == predictions.argmax(-1).tolist()
        assert np.array_equal(answers["score"].to_numpy(np.float32), predictions.softmax(-1).max(-1).values.numpy())
    else:
        assert np.array_equal(np.stack(answers["value"]).astype(np.float32), predictions.numpy())


@pytest.fixture(scope="module")
def maml(tmp_path_factory: pytest.TempPathFactory, kanji_cache: str) -> Run:
    """A tiny MAML kanji run whose model is registered as ``kanji-maml``."""
    return tiny_run(tmp_path_factory.mktemp("maml"), "algorithm=maml", *TINY_KANJI, f"task.cache_dir={kanji_cache}",
                    "tracking.register_as=kanji-maml")


def test_the_loaded_registered_and_in_process_models_answer_as_the_test_step(maml: Run) -> None:
    mlflow.set_tracking_uri(maml.uri)
    registered = mlflow.pyfunc.load_model("models:/kanji-maml/1")
    frame = problem_frame(maml.task, spec_of(registered))
    assert_answers(registered.predict(frame), maml.predictions)
    for uri in (f"runs:/{maml.run_id}/model", str(maml.output_dir / "model")):  # the store's copy, the local folder
        assert_answers(mlflow.pyfunc.load_model(uri).predict(frame), maml.predictions)
    in_process = maml.learner.adapted_predictions(Episodes.of([maml.task]))[0]
    assert torch.equal(in_process, maml.predictions)
    network = mlflow.pyfunc.load_model(str(maml.output_dir / "model")).metadata.flavors
    assert {"python_function", "pytorch"} <= network.keys()
    assert isinstance(mlflow.pytorch.load_model(str(maml.output_dir / "model")), torch.nn.Module)


def test_the_registry_holds_the_run_s_version_with_its_test_metrics(maml: Run) -> None:
    client = MlflowClient(maml.uri)
    [version] = client.search_model_versions("name = 'kanji-maml'")
    run = client.get_run(maml.run_id)
    assert version.run_id == maml.run_id and run.info.status == "FINISHED"
    assert version.tags["meta_test/post_acc"] == f"{run.data.metrics['meta_test/post_acc']:.6g}"
    assert run.data.tags["metalab.model"] == f"runs:/{maml.run_id}/model"


@pytest.fixture
def served(maml: Run) -> Iterator[str]:
    """`mlflow models serve -m models:/kanji-maml/1` on a free loopback port, offline (the local environment)."""
    port = free_port()
    environment = os.environ | {"MLFLOW_TRACKING_URI": maml.uri,
                                "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # it execs uvicorn, from the venv
    process = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/kanji-maml/1", "--env-manager",
                                "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 120 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, 15)  # the server and its worker
        process.wait(timeout=30)


def post(url: str, frame: pd.DataFrame) -> tuple[int, dict]:
    split = frame.to_dict(orient="split")
    split["data"] = [[value.tolist() if isinstance(value, np.ndarray) else value for value in row]
                     for row in split["data"]]
    body = json.dumps({"dataframe_split": {"columns": split["columns"], "data": split["data"]}}).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_served_model_answers_over_http_as_the_loaded_one(maml: Run, served: str) -> None:
    frame = problem_frame(maml.task, spec_of(mlflow.pyfunc.load_model(str(maml.output_dir / "model"))))
    status, answer = post(served, frame)
    assert status == 200, answer
    assert_answers(pd.DataFrame(answer["predictions"]), maml.predictions)
    status, answer = post(served, frame[frame["set"] == "support"])  # no queries: MLflow's 400, ending in our line
    assert status == 400, answer
    assert answer["stack_trace"].strip().splitlines()[-1].startswith(
        "metalab.errors.ConfigError: the problem has no query rows (set=query)")


def test_bad_problems_are_one_line_each(maml: Run) -> None:
    model = mlflow.pyfunc.load_model(str(maml.output_dir / "model"))
    frame = problem_frame(maml.task, spec_of(model))
    support = frame["set"] == "support"
    small = frame.assign(image=[row[:700] for row in frame["image"]])
    cases = {"has 700 values, the model takes 784": small,
             "class 1 has no support example": frame[~(support & (frame["label"] == 1))],
             "the problem has no query rows": frame[support],
             "the support set has 4 classes but the model was meta-trained for 5-way": frame[~(
                 support & (frame["label"] == 4))],
             r"image values must be in \[0, 1\]": frame.assign(image=[row * 255 for row in frame["image"]])}
    for message, problem in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            model.predict(problem)
        assert "\n" not in str(caught.value)


def write_images(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir(parents=True)
    files = []
    for index, image in enumerate(images):
        files.append(folder / f"{index:02d}.png")
        Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy()).save(files[-1])
    return files


def test_metalab_adapt_prints_each_query_s_class_as_the_test_step(maml: Run, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for label in range(5):  # class folders named so that sorted order is the episode's labels
        write_images(tmp_path / "support" / f"class{label}", maml.task.support_x[maml.task.support_y == label])
    write_images(tmp_path / "query", maml.task.query_x)
    cli.main(["adapt", maml.run_id, "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
              "--tracking-uri", maml.uri])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == [f"class{k}" for k in maml.predictions.argmax(-1).tolist()]
    scores = [float(line.split()[2]) for line in lines]
    assert scores == pytest.approx(maml.predictions.softmax(-1).max(-1).values.tolist(), abs=1e-4)

    def fails(*arguments: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as stopped:
            cli.main(["adapt", *arguments, "--tracking-uri", maml.uri])
        error = capsys.readouterr().err.strip()
        assert "\n" not in error
        return stopped.value.code, error

    query = ["--query", str(tmp_path / "query")]
    code, error = fails(maml.run_id, "--support", str(tmp_path / "nowhere"), *query)
    assert code == DATA_MISSING_EXIT_CODE and "is not a folder" in error
    (tmp_path / "support" / "class4").rename(tmp_path / "class4")
    code, error = fails(maml.run_id, "--support", str(tmp_path / "support"), *query)
    assert code == 1 and "has 4 class folders but the model was meta-trained for 5-way problems" in error
    code, error = fails("0123456789abcdef", "--support", str(tmp_path / "support"), *query)
    assert code == 1 and "run 0123456789abcdef: no metalab model there" in error


def test_compare_registers_the_best_run(maml: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["compare", "--tracking-uri", maml.uri, "--out", str(tmp_path), "--register", "kanji-best"])
    out = capsys.readouterr().out
    assert f"best run {maml.run_id} by meta_test/post_acc: registered as models:/kanji-best/1" in out
    client = MlflowClient(maml.uri)
    assert client.get_run(maml.run_id).data.tags["metalab.best"].startswith("meta_test/post_acc = ")
    assert [v.run_id for v in client.search_model_versions("name = 'kanji-best'")] == [maml.run_id]


def test_a_regression_model_answers_as_the_test_step(tmp_path: Path) -> None:
    run = tiny_run(tmp_path, "debug=smoke", "trainer.max_steps=2", "trainer.val_check_interval=2", "task.val_tasks=2",
                   "task.test_tasks=2", "runner.backend=loop")
    model = mlflow.pyfunc.load_model(str(run.output_dir / "model"))
    assert spec_of(model) == ProblemSpec("regression", "vectors", (1,), None, 1)
    assert_answers(model.predict(problem_frame(run.task, spec_of(model))), run.predictions)


def test_a_text_model_tokenises_raw_text_as_its_run_did(tmp_path: Path) -> None:
    """task=wordnet: the model carries the run's tokeniser; raw glosses sent to it are answered as the learner
    answers the same glosses tokenised by the family (the tokeniser is trained on the training split alone)."""
    small = ("model.embedding_size=16", "model.filters=16", "task.vocab_size=2000")
    run = tiny_run(tmp_path, "algorithm=protonet", "task=wordnet", *small, "debug=smoke", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "task.val_tasks=2", "task.test_tasks=2", "task.eval_batch_size=2",
                   "task.queries=2", "task.meta_batch_size=2", "runner.backend=loop")
    family = instantiate(compose_job(tmp_path / "family", ["task=wordnet", "task.vocab_size=2000"]).task)
    glosses = family.read_texts("test")
    chosen = {label: [i for i, other in enumerate(glosses.labels) if other == label][:3] for label in (0, 1)}
    texts = [glosses.texts[chosen[label][0]] for label in (0, 1)] + [glosses.texts[i] for label in (0, 1)
                                                                     for i in chosen[label][1:]]
    inputs = family.serve(torch.tensor([encoding.ids for encoding in family.tokenizer.encode_batch(texts)]))
    task = Task({key: value[:2] for key, value in inputs.items()}, torch.tensor([0, 1]),
                {key: value[2:] for key, value in inputs.items()}, torch.tensor([0, 0, 1, 1]))
    expected = run.learner.adapted_predictions(Episodes.of([task]))[0]
    model = mlflow.pyfunc.load_model(str(run.output_dir / "model"))
    assert spec_of(model).inputs == "texts"
    assert_answers(model.predict(problem_frame(task, spec_of(model), texts)), expected)


def test_a_model_that_cannot_be_saved_is_one_warning_and_the_run_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr("metalab.serving.package.save_model", broken)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train(compose_job(tmp_path / "job", [f"tracking.tracking_uri={uri}", "debug=smoke", "trainer.max_steps=2",
                                         "task.val_tasks=2", "task.test_tasks=2"]))
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "warning: the learner was not saved as an MLflow Model (OSError: No space" in err
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("sinusoid").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["metalab.model"].startswith("none: saving it failed")


def test_tracking_none_saves_no_model(tmp_path: Path) -> None:
    train(compose_job(tmp_path / "job", ["tracking=none", "debug=smoke", "trainer.max_steps=2", "task.val_tasks=2",
                                         "task.test_tasks=2"]))
    assert not (tmp_path / "job" / "model").exists()


@pytest.mark.parametrize("algorithm", [a if a in ("finetune", "protonet") else pytest.param(a, marks=pytest.mark.slow)
                                       for a in ALGORITHMS])
def test_every_algorithm_s_model_answers_as_its_test_step(algorithm: str, tmp_path: Path, kanji_cache: str) -> None:
    run = tiny_run(tmp_path, f"algorithm={algorithm}", *TINY_KANJI, f"task.cache_dir={kanji_cache}",
                   f"tracking.register_as=kanji-{algorithm}")
    mlflow.set_tracking_uri(run.uri)
    model = mlflow.pyfunc.load_model(f"models:/kanji-{algorithm}/1")
    assert_answers(model.predict(problem_frame(run.task, spec_of(model))), run.predictions)
    versions = MlflowClient(run.uri).search_model_versions(f"name = 'kanji-{algorithm}'")
    assert [version.run_id for version in versions] == [run.run_id]
