"""ANIL: adapt only the head; the feature extractor is shared by all tasks (learn2learn's ANIL recipe).

Reference: Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML", ICLR 2020.
"""

from __future__ import annotations

import learn2learn as l2l
from torch import Tensor, nn

from metalab.algorithms.base import GradientBasedAlgorithm, LossFn
from metalab.errors import ConfigError


class ANIL(GradientBasedAlgorithm):
    """``model.features`` is meta-learned but never adapted; a clone of ``model.head`` (wrapped in
    learn2learn's ``MAML``) takes ``inner_steps`` SGD steps on the support features.

    Needs a model with ``features`` and ``head`` (``mlp``, ``cnn4`` and ``resnet12`` have them).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False, backend: str = "auto") -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps, backend)
        if not (isinstance(getattr(model, "features", None), nn.Module)
                and isinstance(getattr(model, "head", None), nn.Module)):
            raise ConfigError(f"algorithm=anil needs a model with `features` and `head` parts; "
                              f"{type(model).__name__} has not: use model=mlp, cnn4 or resnet12")
        self.network = model
        self.head = l2l.algorithms.MAML(model.head, lr=inner_lr, first_order=first_order)

    @property
    def model(self) -> nn.Module:
        return self.network

    def adapt(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn, training: bool) -> nn.Module:
        head = self._steps(self.head.clone(), self.network.features(support_x), support_y, loss_fn, training)
        return nn.Sequential(self.network.features, head)

    def vmap_spec(self) -> tuple[nn.Module, dict[str, Tensor | float], bool]:
        adapted = {name: self.head.lr for name, _ in self.network.named_parameters() if name.startswith("head.")}
        return self.network, adapted, self.head.first_order
