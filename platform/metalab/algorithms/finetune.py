"""Pre-train, then fine-tune: the baselines a meta-learning result is judged against.

Stage 1 (the run's fit) is not episodic: a standard classifier over all training classes of the family, on
mini-batches of labelled examples (:meth:`FineTune.pretraining_loss`; the family serves them, see
:meth:`~metalab.tasks.classification.ClassificationFamily.example_batches`). Stage 2 is every evaluation: the
embedding is frozen, and per task a new classifier is fitted on the support set's features (:meth:`FineTune.adapt`):

- ``head=logistic``: L2-normalised features, multinomial logistic regression (scikit-learn's ``LogisticRegression``,
  L2 penalty, C=1): RFS-simple (Tian et al., "Rethinking Few-Shot Image Classification: a Good Embedding Is All You
  Need?", ECCV 2020, §3 and its ``eval/meta_eval.py``).
- ``head=linear``: a new linear layer trained on the support set (Baseline), and ``head=cosine``: a cosine
  classifier (Baseline++), both as Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019, §3 and their
  ``io_utils``/``test.py``: 100 epochs over the support set in batches of 4, SGD lr 0.01, momentum 0.9,
  dampening 0.9, weight decay 0.001; Baseline++ also pre-trains with a cosine classifier (``pretrain_head=cosine``).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import BATCH_NORM_MODES, BatchNormMode, Context, MetaAlgorithm, Predictor, concatenated
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Inputs, Task

HEADS = ("logistic", "linear", "cosine")
PRETRAIN_HEADS = ("linear", "cosine")


class CosineClassifier(nn.Module):
    """Baseline++'s classifier (Chen et al. 2019, §3.2; their ``distLinear``): the L2-normalised feature times each
    class's weight vector, times ``scale``. As theirs, the weight is weight-normalised per class (direction and
    length learned apart; :func:`torch.nn.utils.parametrizations.weight_norm`, dim 0) and not normalised in the
    forward pass: a class's score is ``scale`` · its learned length · the cosine."""

    def __init__(self, features: int, classes: int, scale: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        linear = (nn.Linear(features, classes, bias=False) if generator is None
                  else initialise(nn.utils.skip_init(nn.Linear, features, classes, bias=False), generator))
        self.linear = nn.utils.parametrizations.weight_norm(linear, dim=0)
        self.scale = scale if scale is not None else 2.0 if classes <= 200 else 10.0  # None: Chen et al.'s rule

    def forward(self, x: Tensor) -> Tensor:  # (B, D) → (B, classes)
        return self.scale * self.linear(F.normalize(x, dim=1, eps=1e-5))


def initialise(linear: nn.Linear, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear``'s own initialisation (weight and bias uniform in ±1/√fan_in) drawn from ``generator``, not the
    global stream (build it with ``nn.utils.skip_init``): a task's head is the same whatever ran before, and threads
    fitting heads at once do not race."""
    bound = linear.in_features ** -0.5
    with torch.no_grad():
        for parameter in linear.parameters():
            parameter.uniform_(-bound, bound, generator=generator)
    return linear


class FineTune(MetaAlgorithm):
    """A pre-trained embedding with a classifier fitted per task (module docstring).

    Arguments:
        model: the network; its ``features`` are the embedding, its ``head`` (a linear layer) only says the
            features' size.
        head: the classifier fitted per task: ``logistic`` (RFS), ``linear`` (Baseline) or ``cosine`` (Baseline++).
        pretrain_head: stage 1's classifier over all training classes: ``linear`` or ``cosine`` (Baseline++).
        batch_size: stage 1's examples per step.
        augment: stage 1 sees augmented images (random crop after 8 px zero padding, horizontal flip), as RFS
            trains; not for characters (a flipped character is another one) or texts.
        cosine_scale: the cosine classifiers' scale; ``None``: Chen et al.'s rule, 2 for up to 200 classes, else 10
            (their ``distLinear``: 10 "to handle >1000 output classes", e.g. Omniglot's or kanji's pre-training).
        head_epochs, head_batch_size, head_lr: the linear and cosine heads' SGD on the support set.
        logistic_c: the logistic regression's inverse L2 strength (scikit-learn's ``C``).
        eval_batch_norm: ``running`` (default: each example embedded alone with the running statistics, as a
            pre-trained network is evaluated) or ``transductive`` (each task's support and queries in one batch).
    """

    problems = ("classification",)
    one_output_per_way = False  # the head is fitted per task: any number of ways
    episodic = False  # meta-training is stage 1: mini-batches of labelled examples, not episodes

    def __init__(self, model: nn.Module, head: Literal["logistic", "linear", "cosine"] = "logistic",
                 pretrain_head: Literal["linear", "cosine"] = "linear", batch_size: int = 64,
                 augment: bool = False, cosine_scale: float | None = None, head_epochs: int = 100,
                 head_batch_size: int = 4, head_lr: float = 0.01, logistic_c: float = 1.0,
                 eval_batch_norm: BatchNormMode = "running") -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"algorithm.head must be {', '.join(HEADS[:-1])} or {HEADS[-1]}, got {head!r}")
        if pretrain_head not in PRETRAIN_HEADS:
            raise ConfigError(f"algorithm.pretrain_head must be linear or cosine, got {pretrain_head!r}")
        if eval_batch_norm not in BATCH_NORM_MODES:
            raise ConfigError(f"algorithm.eval_batch_norm must be transductive or running, got {eval_batch_norm!r}")
        counts = {"batch_size": batch_size, "head_epochs": head_epochs, "head_batch_size": head_batch_size}
        for key, value in counts.items():
            if value < 1:
                raise ConfigError(f"algorithm.{key} must be >= 1, got {value}")
        for key, value in {"cosine_scale": cosine_scale, "head_lr": head_lr, "logistic_c": logistic_c}.items():
            if value is not None and value <= 0:
                raise ConfigError(f"algorithm.{key} must be > 0, got {value}")
        if not isinstance(getattr(model, "head", None), nn.Linear) or not hasattr(model, "features"):
            raise ConfigError(f"algorithm=finetune needs a model with an embedding (model.features) and a linear head "
                              f"(model.head), and {type(model).__name__} has not: use model=cnn4, resnet12, text_cnn "
                              "or transformer")
        self.network = model
        self.head, self.pretrain_head, self.batch_size, self.augment = head, pretrain_head, batch_size, augment
        self.cosine_scale, self.head_epochs, self.head_batch_size = cosine_scale, head_epochs, head_batch_size
        self.head_lr, self.logistic_c, self.eval_batch_norm = head_lr, logistic_c, eval_batch_norm
        self.classifier: nn.Module | None = None  # stage 1's, over the family's training classes (:meth:`bind`)
        model.head.requires_grad_(False)  # the model's own head (ways outputs) is never used

    @property
    def model(self) -> nn.Module:
        return self.network

    @property
    def embedding(self) -> nn.Module:
        return self.network.features

    @property
    def features(self) -> int:
        return self.network.head.in_features

    def bind(self, classes: int) -> None:
        """Build stage 1's classifier over the family's ``classes`` training classes (before the optimiser and
        any checkpoint are made)."""
        self.classifier = (nn.Linear(self.features, classes) if self.pretrain_head == "linear"
                           else CosineClassifier(self.features, classes, self.cosine_scale))

    def pretraining_loss(self, inputs: Inputs, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1: logits over all training classes for a mini-batch of examples, and their cross-entropy."""
        if self.classifier is None:
            raise RuntimeError("FineTune.bind(classes) must be called before pre-training")
        logits = self.classifier(self.embedding(inputs).flatten(1))
        return logits, F.cross_entropy(logits, labels)

    def update_running_statistics(self, task: Task, context: Context) -> None:
        """Nothing: stage 1's forward passes (training mode) move the running statistics, as any classifier's."""

    def unadapted(self, task: Task, context: Context) -> None:
        """No ``pre_*`` metrics: before its head is fitted on the support set, nothing predicts a task's ways."""
        return None

    def adapt(self, task: Task, context: Context) -> Predictor:
        return FittedHead(self, task.support_x, task.support_y)

    def fit_head(self, support: Tensor, labels: Tensor, seed: int = 0) -> nn.Module:
        """A classifier of ``support`` features (S, D) fitted to ``labels`` (S,) by the configured ``head``;
        ``seed``: its initialisation and the order of its mini-batches."""
        if self.head == "logistic":
            return LogisticHead.fit(support, labels, self.logistic_c)
        ways, generator = int(labels.max()) + 1, torch.Generator().manual_seed(seed)
        head = (initialise(nn.utils.skip_init(nn.Linear, self.features, ways), generator) if self.head == "linear"
                else CosineClassifier(self.features, ways, self.cosine_scale, generator)).to(support)
        optimizer = torch.optim.SGD(head.parameters(), lr=self.head_lr, momentum=0.9, dampening=0.9,
                                    weight_decay=0.001)
        with torch.enable_grad():
            for _ in range(self.head_epochs):
                order = torch.randperm(len(labels), generator=generator).to(labels.device)
                for batch in order.split(self.head_batch_size):
                    optimizer.zero_grad()
                    F.cross_entropy(head(support[batch]), labels[batch]).backward()
                    optimizer.step()
        return head.requires_grad_(False)


class FittedHead(nn.Module):
    """A task's predictor: the frozen embedding of its support and queries, and a classifier fitted on the support
    features. With ``eval_batch_norm=transductive`` support and queries are embedded in one batch (as
    :class:`~metalab.algorithms.protonet.PrototypeClassifier`), so the fit waits for the queries."""

    def __init__(self, algorithm: FineTune, support_x: Inputs, support_y: Tensor) -> None:
        super().__init__()
        self.algorithm, self.support_x, self.support_y = algorithm, support_x, support_y

    def forward(self, query_x: Inputs) -> Tensor:
        with torch.no_grad():
            embedded = self.algorithm.embedding(concatenated(self.support_x, query_x)).flatten(1)  # (S + Q, D)
        support, query = embedded[: len(self.support_y)], embedded[len(self.support_y):]
        return self.algorithm.fit_head(support, self.support_y)(query)


class LogisticHead(nn.Module):
    """RFS's classifier: L2-normalised features, multinomial logistic regression fitted by scikit-learn (L-BFGS);
    its log-probabilities are the logits. A class's weights live in sklearn's arrays, copied into a linear layer."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @classmethod
    def fit(cls, support: Tensor, labels: Tensor, c: float) -> LogisticHead:
        from sklearn.exceptions import ConvergenceWarning  # imported when first evaluated: start-up stays light
        from sklearn.linear_model import LogisticRegression

        features = F.normalize(support, dim=1).double().cpu().numpy()
        classes = labels.cpu().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter 1000, as RFS; the fit is used as it is
            regression = LogisticRegression(C=c, max_iter=1000).fit(features, classes)
        weight = torch.as_tensor(regression.coef_, dtype=support.dtype, device=support.device)  # (N, D)
        bias = torch.as_tensor(regression.intercept_, dtype=support.dtype, device=support.device)  # (N,)
        if len(regression.classes_) == 2:  # sklearn keeps one row for two classes: logit of class 1 against 0
            weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
        return cls(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(F.normalize(x, dim=1) @ self.weight.T + self.bias, dim=1)
