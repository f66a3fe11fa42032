"""Small data sets in the standard on-disk layouts, made from rendered KanjiVG glyphs, so the exact code
that reads real Omniglot, mini-ImageNet and image folders is exercised without any download."""

from __future__ import annotations

import csv
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from metalab.tasks.kanji import kanjivg_dir, read_glyphs
from metalab.tasks.strokes import DrawerStyle, render

_GLYPHS = None


def glyph_image(index: int, drawer: int, size: int) -> np.ndarray:
    """Glyph ``index`` (of the hiragana/katakana) by ``drawer``, ink bright on dark, uint8 (size, size)."""
    global _GLYPHS
    if _GLYPHS is None:
        _GLYPHS = [g for g in read_glyphs(kanjivg_dir()) if g.alphabet in ("hiragana", "katakana")]
    glyph = _GLYPHS[index % len(_GLYPHS)]
    return render(glyph.strokes(), size, np.random.default_rng([index, drawer]), DrawerStyle())


def omniglot_tree(root: Path, alphabets: dict[str, tuple[int, int]], drawers: int = 20) -> Path:
    """``<root>/<part>/<Alphabet>/<character>/<id>_<drawer>.png``, black ink on white, 105×105 as Omniglot.

    ``alphabets``: part → (number of alphabets, characters per alphabet).
    """
    index = 0
    for part, (count, characters) in alphabets.items():
        for a in range(count):
            for c in range(characters):
                folder = root / part / f"{part[7:11].title()}_Alphabet_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                for d in range(drawers):
                    Image.fromarray(255 - glyph_image(index, d, 105)).save(folder / f"{index:04d}_{d + 1:02d}.png")
                index += 1
    return root


# Omniglot's 20 evaluation alphabets (659 characters); the other 30 (964) are its background set.
EVALUATION_ALPHABETS = frozenset({
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic", "Gurmukhi",
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti",
    "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG"})


def omniglot_named_tree(root: Path, characters: list[str], drawers: int = 2, size: int = 8) -> Path:
    """Omniglot's folder layout with exactly ``characters`` (``Alphabet/characterNN``), each alphabet in its
    real part, and ``drawers`` tiny seeded-noise images per character: cheap enough for all 1,623."""
    for index, name in enumerate(characters):
        part = "images_evaluation" if name.split("/")[0] in EVALUATION_ALPHABETS else "images_background"
        folder = root / part / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 256, (drawers, size, size), dtype=np.uint8)
        for d in range(drawers):
            Image.fromarray(pixels[d]).save(folder / f"{index:04d}_{d + 1:02d}.png")
    return root


def zip_parts(tree: Path, destination: Path, top_folder: str) -> Path:
    """The official zips' shape: ``<part>.zip`` holding ``<top_folder>/<Alphabet>/<character>/*.png``."""
    destination.mkdir(parents=True, exist_ok=True)
    for part in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(destination / f"{part}.zip", "w") as archive:
            for png in sorted((tree / part).rglob("*.png")):
                archive.write(png, f"{top_folder}/{png.relative_to(tree / part)}")
    return destination


def mini_imagenet_pickles(root: Path, classes: dict[str, int], per_class: int = 20) -> Path:
    """learn2learn's ``mini-imagenet-cache-<split>.pkl``: image_data (N, 84, 84, 3) and class_dict."""
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    for split, count in classes.items():
        images, class_dict = [], {}
        for c in range(count):
            class_dict[f"n{split}{c:05d}"] = list(range(c * per_class, (c + 1) * per_class))
            for d in range(per_class):
                grey = glyph_image(index, d, 84)
                images.append(np.stack([grey, 255 - grey, grey // 2], axis=-1))
            index += 1
        with (root / f"mini-imagenet-cache-{split}.pkl").open("wb") as handle:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, handle)
    return root


def mini_imagenet_csv(root: Path, classes: dict[str, int], per_class: int = 20, size: int = 100) -> Path:
    """Ravi & Larochelle's ``<split>.csv`` (filename,label) with JPEGs in ``images/``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    index = 0
    for split, count in classes.items():
        with (root / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for c in range(count):
                for d in range(per_class):
                    name = f"n{split}{c:05d}{d:04d}.jpg"
                    Image.fromarray(glyph_image(index, d, size)).convert("RGB").save(root / "images" / name)
                    writer.writerow([name, f"n{split}{c:05d}"])
                index += 1
    return root
