"""MetaOptNet: a linear classifier (multi-class SVM or ridge regression) fitted to each episode's support embeddings
by convex optimisation, differentiated through its optimality conditions.

Reference: Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex Optimization", CVPR 2019
(§3.3, eqs. 5-7: the Crammer & Singer SVM's dual; the ridge head). As the authors' code (github.com/kjunelee/MetaOptNet,
``models/classification_heads.py``: ``MetaOptNetHead_SVM_CS``, ``MetaOptNetHead_Ridge``, ``ClassificationHead``):

- ``head=svm``: the dual QP of the Crammer-Singer multi-class SVM, solved by qpth's batched primal-dual interior-point
  method (Amos & Kolter 2017), whose backward differentiates the KKT conditions at the solution; C = 0.1, 15
  iterations. The same QP as learn2learn's ``l2l.nn.SVClassifier`` (``svm_logits``; tests/test_metaoptnet.py checks
  the logits are its), built here in the features' dtype and with qpth's messages off (``verbose=-1``: learn2learn's
  ``verbose=False`` still prints qpth's "inaccurate solution" warning to stdout, and its one-hot labels are float32);
- ``head=ridge`` (MetaOptNet-RR): the same dual for ridge regression, min ½ αᵀ((K + λI) ⊗ I_N)α − 2 vec(Y)ᵀα with
  λ = 50, which the authors also hand to qpth (with a dummy inequality); it has the closed form α = 2(K + λI)⁻¹Y,
  computed here directly (:func:`~metalab.algorithms.r2d2.ridge_regression`);
- logits ``scale · Σ_i α_in ⟨x_i, q⟩`` (the dual's w_n = Σ_i α_in x_i) with a meta-learned ``scale`` from 1.0.

Not here: the authors' label smoothing (ε = 0.1 in training) and their separate support / query forwards (metalab
embeds an episode's support and queries in one batch, as for ProtoNet).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.algorithms.base import BatchNormMode, Context, MetaAlgorithm, Predictor
from metalab.algorithms.protonet import PrototypeBased
from metalab.algorithms.r2d2 import check_batch_norm_mode, ridge_regression, support_set_classifier
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.tasks.episodes import Task

HEADS = ("svm", "ridge")


def crammer_singer_dual(support: Tensor, labels: Tensor, ways: int, c_reg: float, max_iters: int) -> Tensor:
    """The dual variables α (S, N) of the Crammer & Singer SVM on ``support`` (S, D) with ``labels`` (S,), as
    MetaOptNet (Lee et al. 2019, eqs. 5-7) and learn2learn's ``SVClassifier`` pose it.

    Primal: min_{w, ξ} ½ Σ_n ‖w_n‖² + C Σ_i ξ_i s.t. w_{y_i}·x_i − w_n·x_i ≥ 1 − δ(n, y_i) − ξ_i for all i, n.
    Its dual in liblinear's notation, with w_n = Σ_i α_in x_i and K = XXᵀ:

        min_α ½ Σ_n ‖w_n‖² − Σ_i α_{i,y_i}  s.t.  α_in ≤ C δ(n, y_i),  Σ_n α_in = 0,

    i.e. with z = vec(α) (row-major: z[i·N + n] = α_in) the QP min ½ zᵀQz + pᵀz s.t. Gz ≤ h, Az = b with
    Q = K ⊗ I_N (+ I_{SN}, which the authors add "to avoid PSD error from the QP solver": a proximal term ½‖α‖² that
    makes Q positive definite and the solution unique), p = −vec(Y), G = I_{SN}, h = C vec(Y), A = I_S ⊗ 1ᵀ_N,
    b = 0. qpth solves it and its backward gives ∂α/∂K by implicit differentiation of the KKT conditions."""
    from qpth.qp import QPFunction  # imported here: building the algorithm, or any other head, needs no qpth

    samples, like = len(support), {"dtype": support.dtype, "device": support.device}
    one_hot = F.one_hot(labels, ways).to(support.dtype).flatten()  # vec(Y): (S·N,)
    quadratic = torch.kron(support @ support.T, torch.eye(ways, **like)) + torch.eye(samples * ways, **like)
    equality = torch.kron(torch.eye(samples, **like), torch.ones(1, ways, **like))  # (S, S·N)
    solve = QPFunction(verbose=-1, maxIter=max_iters)
    z = solve(quadratic.unsqueeze(0), -one_hot, torch.eye(samples * ways, **like), c_reg * one_hot, equality,
              support.new_zeros(samples))  # (1, S·N)
    return z.view(samples, ways)


class MetaOptNet(PrototypeBased, MetaAlgorithm):
    """Arguments: ``model`` (its ``features`` are the embedding, else the whole model), ``head`` (``svm``: the
    Crammer & Singer SVM, MetaOptNet-SVM; ``ridge``: MetaOptNet-RR), ``svm_c_reg`` (the SVM's C: 0.1),
    ``svm_max_iters`` (qpth's interior-point iterations: 15), ``ridge_lambda`` (the ridge head's λ: 50),
    ``scale`` (the logits' meta-learned scale at the start: 1.0), ``normalize`` (L2-normalise the embeddings
    first, learn2learn's ``SVClassifier(normalize=True)``; the authors do not), ``eval_batch_norm``
    (``transductive`` or ``running``, as :class:`~metalab.algorithms.ProtoNet`).

    Example::

        algorithm = MetaOptNet(ResNet12(ways=5), head="svm")
        logits = algorithm.adapt(task, context)(task.query_x)  # (Q, ways): the SVM fitted to the support set
    """

    def __init__(self, model: nn.Module, head: Literal["svm", "ridge"] = "svm", svm_c_reg: float = 0.1,
                 svm_max_iters: int = 15, ridge_lambda: float = 50.0, scale: float = 1.0, normalize: bool = False,
                 eval_batch_norm: BatchNormMode = "transductive") -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"algorithm.head must be svm or ridge, got {head!r}")
        if svm_c_reg <= 0:
            raise ConfigError(f"algorithm.svm_c_reg must be > 0, got {svm_c_reg}")
        if svm_max_iters < 1:
            raise ConfigError(f"algorithm.svm_max_iters must be >= 1, got {svm_max_iters}")
        if ridge_lambda <= 0:
            raise ConfigError(f"algorithm.ridge_lambda must be > 0, got {ridge_lambda}")
        if scale == 0:
            raise ConfigError("algorithm.scale must not be 0 (every logit would be 0): the authors' start is 1.0")
        if head == "svm" and importlib.util.find_spec("qpth") is None:
            raise ConfigError("algorithm.head=svm solves its QP with qpth, which is not installed: run `make setup` "
                              "(it builds qpth from its sdist, scripts/build_qpth.py), or use algorithm.head=ridge")
        check_batch_norm_mode(eval_batch_norm)
        self.network, self.head, self.eval_batch_norm = model, head, eval_batch_norm
        self.svm_c_reg, self.svm_max_iters, self.ridge_lambda = svm_c_reg, svm_max_iters, ridge_lambda
        self.normalize = normalize
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def adapt(self, task: Task, context: Context) -> Predictor:
        return support_set_classifier(self.embedding, task, self.logits)

    def logits(self, support: Tensor, labels: Tensor, query: Tensor) -> Tensor:
        """``scale · (query xᵀ) α``: (Q, N) from the support (S, D) and query (Q, D) embeddings."""
        if self.normalize:  # learn2learn's: x / (‖x‖ + 1e-8)
            support, query = (x / (x.norm(dim=1, keepdim=True) + 1e-8) for x in (support, query))
        ways = int(labels.max()) + 1
        if self.head == "svm":
            dual = crammer_singer_dual(support, labels, ways, self.svm_c_reg, self.svm_max_iters)  # (S, N)
            return self.scale * (query @ support.T) @ dual
        # MetaOptNet-RR: α = 2(K + λI)⁻¹Y, so Σ_i α_in x_i = 2 · the ridge regression's weights (D, N)
        weights = ridge_regression(support, F.one_hot(labels, ways).to(support.dtype), self.ridge_lambda)
        return self.scale * 2 * query @ weights
