"""Omniglot (Lake et al., Science 2015) from its standard layout, folders or the official zips."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks.image_files import stack_classes
from metalab.tasks.images import ImageClassFamily, LabelledImages

LAYOUT = ("<root>/images_background/<Alphabet>/<character>/*.png and <root>/images_evaluation/... "
          "(or the official images_background.zip and images_evaluation.zip in <root>)")
PARTS = ("images_background", "images_evaluation")
Character = tuple[str, list[Path | bytes]]  # ("Alphabet/character", image sources)


def find_characters(root: Path, part: str) -> list[Character]:
    """Characters of one part, from ``<root>/<part>/``, ``<root>/omniglot-py/<part>/`` or ``<root>/<part>.zip``
    (any top folder inside the zip: entries are read as ``.../<Alphabet>/<character>/<file>.png``)."""
    for folder in (root / part, root / "omniglot-py" / part):
        if folder.is_dir():
            characters: dict[str, list[Path | bytes]] = {}
            for png in sorted(folder.glob("*/*/*.png")):
                characters.setdefault(f"{png.parent.parent.name}/{png.parent.name}", []).append(png)
            return sorted(characters.items())
    for archive in (root / f"{part}.zip", root / "omniglot-py" / f"{part}.zip"):
        if archive.is_file():
            try:
                with zipfile.ZipFile(archive) as zipped:
                    characters = {}
                    for entry in sorted(n for n in zipped.namelist() if n.lower().endswith(".png")):
                        alphabet, character = Path(entry).parts[-3:-1]
                        characters.setdefault(f"{alphabet}/{character}", []).append(zipped.read(entry))
            except (zipfile.BadZipFile, ValueError) as error:
                raise ConfigError(f"{archive} is not a readable Omniglot zip ({error}); expected {LAYOUT}") from None
            return sorted(characters.items())
    return []


VINYALS_TRAIN = 1200  # characters in Vinyals et al.'s training set (train + val); the other 423 test


class Omniglot(ImageClassFamily):
    """Few-shot classification over Omniglot's 1,623 characters.

    Splits (``split``):
      * ``lake`` — Lake et al.'s background set for training (its last ``val_classes`` characters,
        in sorted order, for validation) and the evaluation set for test.
      * ``vinyals`` — 1,200 characters for training and 423 for test, as Vinyals et al. 2016 (and MAML,
        ProtoNets); the characters are ordered by (set, alphabet, character) and the last ``val_classes``
        of the 1,200 validate (Snell et al. use 172). The exact lists of the original papers were not
        published with the data; this split is deterministic and disjoint.
    ``rotations``: add 90°, 180°, 270° rotations of each character as new classes (Santoro et al. 2016).
    Images are inverted (ink bright) and resized to ``image_size`` (28). ``kwargs``:
    :class:`ImageClassFamily`'s episode settings and :class:`TaskFamily`'s.
    """

    name = "omniglot"

    def __init__(self, *, root: str | Path = "data/omniglot", split: Literal["lake", "vinyals"] = "vinyals",
                 val_classes: int = 172, rotations: bool = False, image_size: int = 28, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if split not in ("lake", "vinyals"):
            raise ConfigError(f"task.split must be lake or vinyals, got {split!r}")
        if val_classes < 1:
            raise ConfigError(f"task.val_classes must be >= 1, got {val_classes}")
        self.root, self.split, self.val_classes = Path(root).expanduser(), split, val_classes
        self.rotations, self.image_size = rotations, image_size
        self._splits: dict[str, LabelledImages] | None = None

    def load_split(self, split: str) -> LabelledImages:
        if self._splits is None:
            self._splits = {name: self._load(characters) for name, characters in self.characters_by_split().items()}
        return self._splits[split]

    def characters_by_split(self) -> dict[str, list[Character]]:
        background, evaluation = (find_characters(self.root, part) for part in PARTS)
        if not background or not evaluation:
            missing = " and ".join(part for part, found in zip(PARTS, (background, evaluation), strict=True)
                                   if not found)
            raise DataMissingError(f"Omniglot's {missing} not found under task.root={self.root} (resolved "
                              f"{self.root.resolve()}): expected {LAYOUT}; set task.root to that folder")
        if self.split == "lake":
            train, test = background, evaluation
        else:
            everything = background + evaluation
            if len(everything) <= VINYALS_TRAIN:
                raise ConfigError(f"the vinyals split needs more than {VINYALS_TRAIN} characters, {self.root} has "
                                  f"{len(everything)}: use task.split=lake or the full Omniglot")
            train, test = everything[:VINYALS_TRAIN], everything[VINYALS_TRAIN:]
        if len(train) <= self.val_classes:
            raise ConfigError(f"task.val_classes={self.val_classes} leaves no training character "
                              f"({len(train)} in all): lower task.val_classes")
        return {"train": train[:-self.val_classes], "val": train[-self.val_classes:], "test": test}

    def _load(self, characters: list[Character]) -> LabelledImages:
        data = stack_classes(characters, self.image_size, "L", invert=True)
        if not self.rotations:
            return data
        return rotated_classes(data)


def rotated_classes(data: LabelledImages) -> LabelledImages:
    """Each class four times: as it is and rotated by 90°, 180°, 270°, each a class of its own."""
    classes = len(data.class_names)
    images = [data.images.rot90(quarter, dims=(2, 3)) for quarter in range(4)]
    labels = [data.labels + quarter * classes for quarter in range(4)]
    names = [f"{name}@{90 * quarter}" for quarter in range(4) for name in data.class_names]
    return LabelledImages(torch.cat(images), torch.cat(labels), names)

