"""Image families rendered offline once per setting (kanji, glyphs): the cache file they share the handling of."""

from __future__ import annotations

import hashlib
import json
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalab.errors import ConfigError
from metalab.tasks.classification import SPLITS
from metalab.tasks.images import ImageClassFamily, LabelledImages


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metalab"


def check_render_settings(image_size: int, drawers: int, num_classes: int, variation: float, min_alphabet_size: int,
                          max_alphabet_size: int, background_fraction: float, val_fraction: float) -> None:
    """The settings kanji and glyphs share, each checked; one line naming the keys on a bad one."""
    if image_size < 8 or drawers < 1 or num_classes < 3 or variation < 0:
        raise ConfigError(f"task.image_size >= 8, task.drawers >= 1, task.num_classes >= 3 and task.variation "
                          f">= 0 are needed; got {image_size}, {drawers}, {num_classes}, {variation}")
    if not 1 <= min_alphabet_size <= max_alphabet_size:
        raise ConfigError("task.min_alphabet_size and task.max_alphabet_size need 1 <= min_alphabet_size <= "
                          f"max_alphabet_size, got {min_alphabet_size} and {max_alphabet_size}")
    if not 0 < val_fraction < background_fraction < 1:
        raise ConfigError("task.val_fraction and task.background_fraction need 0 < val_fraction < "
                          f"background_fraction < 1, got {val_fraction} and {background_fraction}")


class RenderedFamily(ImageClassFamily):
    """An image family drawn by code: rendered once into ``<cache_dir>/<name>-<key>.npz`` (``key``: a hash of
    :meth:`render_settings`, so another setting or renderer version is another file), then loaded in well
    under a second. A subclass sets ``cache_dir`` and implements :meth:`render_settings` and :meth:`render`."""

    cache_dir: Path

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._splits: dict[str, LabelledImages] | None = None
        self._cache: Path | None = None  # the rendered images' file, once loaded

    @abstractmethod
    def render_settings(self) -> dict[str, Any]:
        """Everything the rendered images depend on (settings, renderer version, the source package's version)."""

    @abstractmethod
    def render(self, cache: Path) -> dict[str, np.ndarray]:
        """Per split ``<split>_images`` uint8 (N, C, H, W), ``<split>_labels`` (N,), ``<split>_classes`` (names);
        ``cache``: where they will be kept (for a progress line)."""

    def load_split(self, split: str) -> LabelledImages:
        if self._splits is None:
            self._splits = self._load_or_render()
        return self._splits[split]

    def data_description(self) -> dict[str, str]:
        description = super().data_description()  # loads the splits: the cache file is known after
        return description | {"source": str(self._cache)}

    def _load_or_render(self) -> dict[str, LabelledImages]:
        key = hashlib.sha256(json.dumps(self.render_settings(), sort_keys=True).encode()).hexdigest()[:16]
        cache = self.cache_dir / f"{self.name}-{key}.npz"
        if not cache.exists():
            arrays = self.render(cache)
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(partial, **arrays)
            partial.replace(cache)  # atomic: concurrent jobs never read a half-written cache
        self._cache = cache
        stored = np.load(cache)
        return {split: LabelledImages(torch.from_numpy(stored[f"{split}_images"]),
                                      torch.from_numpy(stored[f"{split}_labels"]),
                                      [str(name) for name in stored[f"{split}_classes"]]) for split in SPLITS}
