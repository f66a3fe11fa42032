"""N-way, K-shot image classification episodes: :class:`~metalab.tasks.classification.ClassificationFamily` over
uint8 images, served as floats in [0, 1] with the model's channels."""

from __future__ import annotations

from typing import Any

import torch

from metalab.errors import ConfigError
from metalab.tasks.classification import ClassificationFamily, ItemStore, LabelledItems

ImageStore = ItemStore  # images decoded when drawn: ``store[indices]`` → uint8 (n, C, H, W)


class LabelledImages(LabelledItems):
    """All images of one split: ``items`` uint8 (N, C, H, W) (a tensor, or an :class:`ImageStore` that decodes
    them when drawn), ``labels`` int64 (N,), class names by label; ``images`` names the items."""

    @property
    def images(self) -> torch.Tensor | ImageStore:
        return self.items


class ImageClassFamily(ClassificationFamily):
    """Few-shot image classification (see :class:`~metalab.tasks.classification.ClassificationFamily` for the
    episodes and ``sampler``). Images are served as float in [0, 1], (C, H, W), with ``channels`` 1 (grey) or 3
    (RGB) whatever the data's own. ``kwargs``: :class:`ClassificationFamily`'s; a subclass takes ``**kwargs`` too
    and names an argument of these only to give it another default."""

    examples = "images"

    def __init__(self, *, ways: int = 5, shots: int = 1, queries: int = 15, channels: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, **kwargs)
        if channels not in (1, 3):
            raise ConfigError(f"task.channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.channels = channels

    def serve(self, items: torch.Tensor) -> torch.Tensor:
        """uint8 images as float in [0, 1] with the model's channels (grey ↔ RGB)."""
        images = items.float().div_(255)
        if images.shape[1] != self.channels:
            images = images.expand(-1, 3, -1, -1) if self.channels == 3 else images.mean(1, keepdim=True)
        return images
