"""A run's learner as an MLflow ``pyfunc`` model: ``predict`` adapts to a few-shot problem's support set and answers
its queries, exactly as the run's test step adapts (``MetaLearner.adapted_predictions``).

The model's artifacts (written by :func:`metalab.serving.package.save_model`): ``config`` (the run's resolved
``config.yaml``), ``weights`` (the algorithm's state: the initialisation and anything else meta-learned, e.g.
Meta-SGD's rates), ``problem`` (:class:`~metalab.serving.problem.ProblemSpec`), ``learner`` (the run's last
meta-iteration, and a pre-training classifier's classes) and, for texts, ``tokenizer`` (the run's own).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metalab.learner import MetaLearner
from metalab.runner import TaskRunner
from metalab.serving.problem import ProblemSpec, answers, read_problem
from metalab.tasks.episodes import Episodes

# The served model adapts one problem at a time with the loop backend, the reference every backend is tested
# against: a run whose test ran under vmap computed the same to float rounding (rel 1e-5, tests/test_backends.py).
BACKEND = "loop"


def rebuild(config: DictConfig, state: dict[str, torch.Tensor], problem: str,
            pretrain_classes: int | None) -> MetaLearner:
    """The run's learner from its resolved config and the algorithm's state, on the CPU, in evaluation mode (as
    Lightning puts it for the test step: dropout off; batch norm as ``algorithm.eval_batch_norm`` says)."""
    model = instantiate(config.model)
    algorithm = instantiate(config.algorithm, model=model)
    if pretrain_classes is not None:  # algorithm=finetune: its pre-training classifier, built as job.build does
        algorithm.bind(pretrain_classes)
    algorithm.load_state_dict(state)
    learner = instantiate(config.learner, algorithm=algorithm, optimizer=instantiate(config.optimizer),
                          problem=problem, runner=TaskRunner(BACKEND), scheduler=None)
    return learner.eval()


class FewShotModel(mlflow.pyfunc.PythonModel):
    """``predict(problem)``: a table of support rows (with labels or targets) and query rows → a table of the
    queries' predictions (:mod:`metalab.serving.problem` gives the format).

    Example:
        model = mlflow.pyfunc.load_model("models:/kanji-maml/1")
        model.predict(frame)  # frame: columns set, image, label; one row per example
    """

    learner: MetaLearner
    spec: ProblemSpec

    def load_context(self, context: Any) -> None:
        artifacts = {name: Path(path) for name, path in context.artifacts.items()}
        self.spec = ProblemSpec.from_json(artifacts["problem"].read_text())
        about = json.loads(artifacts["learner"].read_text())
        self.step = int(about["step"])
        state = torch.load(artifacts["weights"], map_location="cpu", weights_only=True)
        self.learner = rebuild(OmegaConf.load(artifacts["config"]), state, self.spec.problem,
                               about.get("pretrain_classes"))
        self.tokenizer = None
        if "tokenizer" in artifacts:
            from tokenizers import Tokenizer  # texts only

            self.tokenizer = Tokenizer.from_file(str(artifacts["tokenizer"]))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Raw texts as the run's text family served them: ``{"ids", "mask"}`` (n, max_length)."""
        ids = torch.tensor([encoding.ids for encoding in self.tokenizer.encode_batch(texts)], dtype=torch.long)
        return {"ids": ids, "mask": ids != self.spec.pad_id}

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        task = read_problem(model_input, self.spec, self.tokenize)
        predictions = self.learner.adapted_predictions(Episodes.of([task]), step=self.step)
        return answers(predictions[0], self.spec)
