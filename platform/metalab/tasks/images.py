"""N-way, K-shot image classification episodes: :class:`~metalab.tasks.classification.ClassificationFamily` over
uint8 images, served as floats in [0, 1] with the model's channels."""

from __future__ import annotations

from typing import Any

import torch

from metalab.errors import ConfigError
from metalab.tasks.classification import ClassificationFamily, ItemStore, LabelledItems

PAD = 8  # pixels of zeros around an image before its random crop (RFS: RandomCrop(84, padding=8))
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

    def augmented(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pre-training's augmentation (RFS's, without its colour jitter): each image (B, C, H, W) zero-padded by
        ``PAD`` pixels, cropped back to H×W at a random offset, and flipped left–right with probability ½."""
        count, _, height, width = inputs.shape
        padded = torch.nn.functional.pad(inputs, (PAD, PAD, PAD, PAD))
        rows, columns = torch.randint(0, 2 * PAD + 1, (2, count), generator=generator).tolist()
        flips = (torch.rand(count, generator=generator) < 0.5).tolist()
        crops = [padded[i, :, top:top + height, left:left + width] for i, (top, left) in enumerate(zip(rows, columns,
                                                                                                         strict=True))]
        return torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips, strict=True)])
