"""Omniglot (Lake et al., Science 2015) from its standard layout, folders or the official zips."""

from __future__ import annotations

import random
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks.classification import SPLITS
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


SPLITS_FOLDER = resources.files("metalab.tasks") / "splits"  # package data: the published split lists
VINYALS_FOLDER = SPLITS_FOLDER / "omniglot_vinyals"
MAML_SIZES = {"train": 1100, "val": 100, "test": 423}  # Finn et al.'s code: num_train 1200 − num_val 100; the rest
MAML_SEED = 1  # their random.seed(1) before random.shuffle of the 1,623 character folders
LAKE_VAL_CLASSES = 172  # split=lake's default validation characters, as many as the Vinyals split's val
SPLIT_CHOICES = ("lake", "vinyals", "maml")


def vinyals_characters() -> dict[str, list[str]]:
    """The Vinyals split's characters, ``Alphabet/characterNN`` sorted, per split: the unique characters of
    Snell et al.'s ``{train,val,test}.txt`` (whose lines are ``Alphabet/characterNN/rotDDD``, all four
    rotations of every character, so ``rotations=True`` gives exactly the files' classes)."""
    return {split: sorted({line.rsplit("/", 1)[0] for line in (VINYALS_FOLDER / f"{split}.txt").read_text().split()})
            for split in SPLITS}


def maml_characters(names: list[str]) -> dict[str, list[str]]:
    """MAML's protocol on Omniglot's 1,623 characters: shuffled with Python's ``random`` seeded 1, then the
    first 1,100 train, the next 100 validate, the last 423 test (cbfinn/maml, ``data_generator.py``). They
    shuffle ``os.listdir`` order (file-system dependent); metalab shuffles the sorted names, so the sets are
    fixed and disjoint but not guaranteed to be the authors'."""
    order = sorted(names)
    random.Random(MAML_SEED).shuffle(order)
    train, val = MAML_SIZES["train"], MAML_SIZES["train"] + MAML_SIZES["val"]
    return {"train": order[:train], "val": order[train:val], "test": order[val:]}


class Omniglot(ImageClassFamily):
    """Few-shot classification over Omniglot's 1,623 characters.

    Splits (``split``), each disjoint by character:
      * ``vinyals`` — Vinyals et al. 2016's split as Snell et al. 2017 published it (ProtoNets' code):
        1,028 train / 172 val / 423 test characters from the lists shipped in ``metalab/tasks/splits/``
        (MIT). The test set is 12 evaluation alphabets and part of Gurmukhi.
      * ``maml`` — MAML's (Finn et al. 2017 code): all 1,623 shuffled with a fixed seed, 1,100 / 100 / 423
        (the paper's "1200 for training" counts the 100 validation characters); see :func:`maml_characters`.
      * ``lake`` — Lake et al.'s background set for training (its last ``val_classes`` characters, in sorted
        order, for validation; ``None`` = 172) and the evaluation set for test: alphabet-disjoint.
    ``val_classes`` applies to ``lake`` only; the other splits fix their validation sets.
    ``rotations``: add 90°, 180°, 270° rotations of each character as new classes of its split (Santoro et
    al. 2016; the Vinyals lists hold all four rotations of each character). Images are inverted (ink
    bright) and resized to ``image_size`` (28). ``kwargs``: :class:`ImageClassFamily`'s episode settings and
    :class:`TaskFamily`'s.
    """

    name = "omniglot"

    def __init__(self, *, root: str | Path = "data/omniglot", split: Literal["lake", "vinyals", "maml"] = "vinyals",
                 val_classes: int | None = None, rotations: bool = False, image_size: int = 28,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if split not in SPLIT_CHOICES:
            raise ConfigError(f"task.split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
        if val_classes is not None and split != "lake":
            raise ConfigError(f"task.val_classes applies to task.split=lake only; split={split} has a fixed "
                              "validation set: remove task.val_classes (or set it to null)")
        if val_classes is not None and val_classes < 1:
            raise ConfigError(f"task.val_classes must be >= 1, got {val_classes}")
        self.root, self.split, self.val_classes = Path(root).expanduser(), split, val_classes or LAKE_VAL_CLASSES
        self.rotations, self.image_size = rotations, image_size
        self._splits: dict[str, LabelledImages] | None = None

    def load_split(self, split: str) -> LabelledImages:
        if self._splits is None:
            self._splits = {name: self._load(characters) for name, characters in self.characters_by_split().items()}
        return self._splits[split]

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"source": str(self.root.resolve()), "split": self.split}

    def characters_by_split(self) -> dict[str, list[Character]]:
        background, evaluation = (find_characters(self.root, part) for part in PARTS)
        if not background or not evaluation:
            missing = " and ".join(part for part, found in zip(PARTS, (background, evaluation), strict=True)
                                   if not found)
            raise DataMissingError(f"Omniglot's {missing} not found under task.root={self.root} (resolved "
                              f"{self.root.resolve()}): expected {LAYOUT}; set task.root to that folder")
        if self.split == "lake":
            if len(background) <= self.val_classes:
                raise ConfigError(f"task.val_classes={self.val_classes} leaves no training character "
                                  f"({len(background)} in all): lower task.val_classes")
            return {"train": background[:-self.val_classes], "val": background[-self.val_classes:],
                    "test": evaluation}
        sources = dict(background + evaluation)
        if self.split == "maml" and len(sources) != sum(MAML_SIZES.values()):
            raise ConfigError(f"task.split=maml needs Omniglot's 1623 characters, {self.root} has {len(sources)}: "
                              "point task.root at the full Omniglot or use task.split=lake")
        names = vinyals_characters() if self.split == "vinyals" else maml_characters(list(sources))
        absent = [name for members in names.values() for name in members if name not in sources]
        if absent:
            raise ConfigError(f"task.split={self.split} lists {len(absent)} characters not under task.root={self.root} "
                              f"(e.g. {absent[0]}): point task.root at the full Omniglot or use task.split=lake")
        return {split: [(name, sources[name]) for name in members] for split, members in names.items()}

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

