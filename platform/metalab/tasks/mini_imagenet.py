"""mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle's 64/16/20-class split), 84×84 RGB."""

from __future__ import annotations

import csv
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks.image_files import stack_classes
from metalab.tasks.images import ImageClassFamily, LabelledImages

CACHE_NAMES = {"train": "train", "val": "validation", "test": "test"}  # learn2learn's pickle names
LAYOUT = ("learn2learn's <root>/mini-imagenet-cache-{train,validation,test}.pkl, or Ravi & Larochelle's "
          "<root>/{train,val,test}.csv (filename,label) with the images in <root>/images/")


class MiniImageNet(ImageClassFamily):
    """Few-shot classification on mini-ImageNet, read from either standard on-disk form (see ``LAYOUT``).

    Pickles hold ``{"image_data": uint8 (N, 84, 84, 3), "class_dict": {class: [indices]}}`` per split;
    CSV rows name an image file in ``images/`` and its class. Images are resized to ``image_size`` (84).
    ``channels`` defaults to 3, the data's RGB. ``kwargs``: :class:`ImageClassFamily`'s episode settings and
    :class:`TaskFamily`'s.
    """

    name = "mini_imagenet"

    def __init__(self, *, root: str | Path = "data/mini-imagenet", image_size: int = 84, channels: int = 3,
                 **kwargs: Any) -> None:
        super().__init__(channels=channels, **kwargs)
        self.root, self.image_size = Path(root).expanduser(), image_size
        self._splits: dict[str, LabelledImages] = {}

    def load_split(self, split: str) -> LabelledImages:
        if split not in self._splits:
            pickled = self.root / f"mini-imagenet-cache-{CACHE_NAMES[split]}.pkl"
            listed = self.root / f"{split}.csv"
            if pickled.is_file():
                self._splits[split] = self._from_pickle(pickled)
            elif listed.is_file():
                self._splits[split] = self._from_csv(listed)
            else:
                raise DataMissingError(f"mini-ImageNet's {split} split not found under task.root={self.root} (tried "
                                  f"{pickled} and {listed}): expected {LAYOUT}; set task.root to that folder")
        return self._splits[split]

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"source": str(self.root.resolve())}

    def _from_pickle(self, path: Path) -> LabelledImages:
        try:
            with path.open("rb") as handle:
                content = pickle.load(handle)
            images, class_dict = np.asarray(content["image_data"]), content["class_dict"]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is not a mini-ImageNet pickle ({type(error).__name__}: {error}); "
                              f"expected {LAYOUT}") from None
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"{path}: image_data has shape {images.shape}, expected (N, H, W, 3)")
        names = sorted(class_dict)
        labels = np.empty(len(images), np.int64)
        for label, name in enumerate(names):
            labels[np.asarray(class_dict[name])] = label
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        if tensor.shape[-1] != self.image_size:
            tensor = torch.nn.functional.interpolate(tensor.float(), size=self.image_size, mode="bilinear",
                                                     antialias=True).round().clamp(0, 255).to(torch.uint8)
        return LabelledImages(tensor, torch.from_numpy(labels), names)

    def _from_csv(self, path: Path) -> LabelledImages:
        by_class: dict[str, list[Path]] = defaultdict(list)
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    by_class[row["label"]].append(self.root / "images" / row["filename"])
                except KeyError:
                    raise ConfigError(f"{path} needs the columns filename,label; expected {LAYOUT}") from None
        missing = next((file for files in by_class.values() for file in files if not file.is_file()), None)
        if missing is not None:
            raise ConfigError(f"{path} lists {missing.name} but {missing} does not exist; expected {LAYOUT}")
        return stack_classes(sorted(by_class.items()), self.image_size, "RGB")
