"""Your own few-shot data: ``<root>/<class>/*.{png,jpg}`` and a split file naming each split's classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks.classification import SPLITS
from metalab.tasks.image_files import IMAGE_SUFFIXES, stack_classes
from metalab.tasks.images import ImageClassFamily, LabelledImages

LAYOUT = ("<root>/<class>/*.png|jpg and a split file (YAML or JSON) {train: [classes], val: [classes], "
          "test: [classes]}")


class ImageFolder(ImageClassFamily):
    """Few-shot classification over a class-per-folder image tree.

    ``split_file`` (default ``<root>/split.yaml``) lists the classes of each split; the three lists must
    be disjoint. Images are read as grey (``channels: 1``) or RGB (``channels: 3``, the default) at
    ``image_size``. ``kwargs``: :class:`ImageClassFamily`'s episode settings and :class:`TaskFamily`'s.
    """

    name = "folder"

    def __init__(self, *, root: str | Path, split_file: str | Path | None = None, image_size: int = 84,
                 channels: int = 3, **kwargs: Any) -> None:
        super().__init__(channels=channels, **kwargs)
        self.root = Path(root).expanduser()
        self.split_file = Path(split_file).expanduser() if split_file else self.root / "split.yaml"
        self.image_size = image_size
        self._classes: dict[str, list[str]] | None = None
        self._splits: dict[str, LabelledImages] = {}

    def classes_by_split(self) -> dict[str, list[str]]:
        if self._classes is None:
            if not self.root.is_dir():
                raise DataMissingError(f"task.root={self.root} is not a folder: expected {LAYOUT}")
            if not self.split_file.is_file():
                raise ConfigError(f"split file {self.split_file} not found: set task.split_file; expected {LAYOUT}")
            try:
                listed = yaml.safe_load(self.split_file.read_text())
            except yaml.YAMLError as error:
                raise ConfigError(f"{self.split_file} is not YAML/JSON ({error.__class__.__name__}); "
                                  f"expected {LAYOUT}") from None
            if not isinstance(listed, dict) or any(not isinstance(listed.get(s), list) for s in SPLITS):
                raise ConfigError(f"{self.split_file} must map train, val and test to lists of classes; "
                                  f"expected {LAYOUT}")
            classes = {split: [str(name) for name in listed[split]] for split in SPLITS}
            seen: dict[str, str] = {}
            for split, names in classes.items():
                for name in names:
                    if name in seen:
                        raise ConfigError(f"{self.split_file}: class {name!r} is in both {seen[name]} and {split}")
                    seen[name] = split
                    if not (self.root / name).is_dir():
                        raise ConfigError(f"{self.split_file} names class {name!r} but {self.root / name} is not "
                                          f"a folder; expected {LAYOUT}")
            self._classes = classes
        return self._classes

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"source": str(self.root.resolve()),
                                             "split_file": str(self.split_file.resolve())}

    def load_split(self, split: str) -> LabelledImages:
        if split not in self._splits:
            classes = [(name, sorted(file for file in (self.root / name).iterdir()
                                     if file.suffix.lower() in IMAGE_SUFFIXES))
                       for name in self.classes_by_split()[split]]
            empty = next((name for name, files in classes if not files), None)
            if empty is not None:  # said here: the episode check would suggest fewer shots, which cannot help
                raise ConfigError(f"class folder {self.root / empty} has no images ({', '.join(IMAGE_SUFFIXES)}): add "
                                  f"images to it or remove {empty!r} from the {split} list of {self.split_file}")
            self._splits[split] = stack_classes(classes, self.image_size, "L" if self.channels == 1 else "RGB")
        return self._splits[split]
