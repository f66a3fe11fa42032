"""Offline handwriting-like few-shot family from KanjiVG's stroke-order glyphs (Omniglot-style).

Each glyph (kanji, hiragana, katakana) is a class; each class has ``drawers`` seeded variations of it
(see :mod:`metalab.tasks.strokes`). "Alphabets" are the kana sets and the kanji's Kangxi radicals
(KanjiVG's ``kvg:radical``), and the train/val/test split is by alphabet, as Omniglot's
background/evaluation split is: no test glyph, and no glyph of a test alphabet, is seen in training. That
is weaker than Omniglot's unseen alphabets: a kanji is filed under one radical but is built of several
components, and the same components (radicals among them) recur in glyphs of other alphabets, so a test
glyph's strokes are often partly familiar. See :class:`KanjiHandwriting`.
KanjiVG © Ulrich Apel and contributors, CC BY-SA 3.0 (see NOTICE).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from metalab.errors import ConfigError
from metalab.tasks.rendered import RenderedFamily, check_render_settings, default_cache_dir
from metalab.tasks.strokes import DrawerStyle, Stroke, parse_path, render

RENDER_VERSION = 2  # bump when rendering or the split changes, so stale caches are not reused (2: no short alphabet)
_RADICAL_PRIORITY = ("tradit", "general", "nelson", "jis")
_PATH = re.compile(r'<path [^>]*?\bd="([^"]+)"')
_RADICAL = re.compile(r'kvg:element="([^"]+)"[^>]*?kvg:radical="([a-z]+)"')


@dataclass
class Glyph:
    code: str  # KanjiVG file stem, e.g. "05b57"
    alphabet: str  # "hiragana", "katakana" or "radical-<element>"
    svg: str

    def strokes(self) -> list[Stroke]:
        return [parse_path(d) for d in _PATH.findall(self.svg)]


def kanjivg_dir() -> Path:
    """Where the `kanjivg` package put its SVGs (``site-packages/kanji/``)."""
    try:
        folder = Path(str(metadata.distribution("kanjivg").locate_file("kanji")))
    except metadata.PackageNotFoundError:
        folder = Path()
    if not folder.is_dir():
        raise ConfigError("task=kanji needs the `kanjivg` package (its SVGs in site-packages/kanji/): run `make setup`")
    return folder


def alphabet_of(code: str, svg: str) -> str | None:
    """The kana set or the Kangxi radical a glyph belongs to; ``None`` for other symbols."""
    point = int(code, 16)
    if 0x3041 <= point <= 0x309F:
        return "hiragana"
    if 0x30A1 <= point <= 0x30FF:
        return "katakana"
    if not 0x4E00 <= point <= 0x9FFF:
        return None
    radicals = {kind: element for element, kind in _RADICAL.findall(svg)}
    for kind in _RADICAL_PRIORITY:
        if kind in radicals:
            return f"radical-{radicals[kind]}"
    return None


def read_glyphs(folder: Path) -> list[Glyph]:
    """Every base glyph (no ``-Kaisho``-style variants) that belongs to an alphabet."""
    glyphs = []
    for svg_path in sorted(folder.glob("*.svg")):
        if "-" in svg_path.stem:
            continue
        svg = svg_path.read_text(encoding="utf-8")
        alphabet = alphabet_of(svg_path.stem, svg)
        if alphabet and "<path " in svg:
            glyphs.append(Glyph(svg_path.stem, alphabet, svg))
    return glyphs


def split_alphabets(glyphs: list[Glyph], num_classes: int, min_alphabet_size: int, max_alphabet_size: int,
                    background_fraction: float, val_fraction: float, split_seed: int) -> dict[str, list[Glyph]]:
    """Pick whole alphabets in a seeded order up to ``num_classes`` glyphs, and give each alphabet to the split
    furthest below its share: train ``background_fraction − val_fraction``, val ``val_fraction``, test the rest.

    Every alphabet given holds ``min_alphabet_size``–``max_alphabet_size`` glyphs (Omniglot's hold 14–55
    characters): one longer than ``max_alphabet_size`` gives its first glyphs; one that would leave less than
    ``min_alphabet_size`` of the budget gives fewer, so that the next alphabet still fits whole enough; an
    alphabet that cannot give ``min_alphabet_size`` within the budget is skipped. So the splits hold exactly
    ``num_classes`` glyphs unless no remaining alphabet fits what is left.
    """
    by_alphabet: dict[str, list[Glyph]] = defaultdict(list)
    for glyph in glyphs:
        by_alphabet[glyph.alphabet].append(glyph)
    names = sorted(name for name, members in by_alphabet.items() if len(members) >= min_alphabet_size)
    shares = {"train": background_fraction - val_fraction, "val": val_fraction, "test": 1 - background_fraction}
    splits: dict[str, list[Glyph]] = {split: [] for split in shares}
    total = 0
    for index in np.random.default_rng(split_seed).permutation(len(names)):
        room = num_classes - total
        if room < min_alphabet_size:
            break
        members = by_alphabet[names[index]]
        take = min(max_alphabet_size, len(members), room)
        if 0 < room - take < min_alphabet_size:  # the rest could hold no alphabet: leave it one that fits
            take = room - min_alphabet_size
        if take < min_alphabet_size:
            continue
        total += take
        split = max(shares, key=lambda name: shares[name] * num_classes - len(splits[name]))
        splits[split].extend(members[:take])
    empty = [split for split, members in splits.items() if not members]
    if empty:
        raise ConfigError(f"task.num_classes={num_classes} leaves the {'/'.join(empty)} split without an alphabet: "
                          "raise task.num_classes or lower task.max_alphabet_size")
    return splits


class KanjiHandwriting(RenderedFamily):
    """Omniglot-like few-shot classification rendered from KanjiVG, offline.

    The split is class-disjoint and alphabet-disjoint, alphabets being radical groups (and the two kana
    sets): each glyph is in one split, each alphabet in one split, and every alphabet has
    ``min_alphabet_size``–``max_alphabet_size`` glyphs. It is not component-disjoint: a kanji is filed
    under one radical yet contains others, and those components recur across alphabets, so "unseen
    alphabet" here means less than in Omniglot, where a test alphabet's strokes are new. With the defaults
    (kanjivg 20260714), 634 of the 644 test kanji share a component (KanjiVG ``kvg:element``) with some
    training glyph, and 13 of the 18 test radicals occur inside training glyphs.

    Arguments: ``image_size`` (28 as Omniglot), ``drawers`` per class (20 as Omniglot), ``num_classes``
    (1623 as Omniglot), ``background_fraction`` / ``val_fraction`` of classes for train+val / val,
    ``min_alphabet_size`` and ``max_alphabet_size`` (glyphs an alphabet must have / may give; see
    :func:`split_alphabets`),
    ``split_seed`` (which alphabets go where), ``variation`` (scales all drawer variation; 0 = identical
    drawers), ``cache_dir`` (rendered images; ``None`` = ``$XDG_CACHE_HOME/metalab`` or ``~/.cache/metalab``).
    ``kwargs``: :class:`ImageClassFamily`'s episode settings (``channels`` 1 grey, 3 = grey repeated) and
    :class:`TaskFamily`'s.
    """

    name = "kanji"

    def __init__(self, *, image_size: int = 28, drawers: int = 20, num_classes: int = 1623,
                 background_fraction: float = 0.6, val_fraction: float = 0.1, min_alphabet_size: int = 14,
                 max_alphabet_size: int = 55, split_seed: int = 0, variation: float = 1.0,
                 cache_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_render_settings(image_size, drawers, num_classes, variation, min_alphabet_size, max_alphabet_size,
                              background_fraction, val_fraction)
        self.image_size, self.drawers, self.num_classes = image_size, drawers, num_classes
        self.split_settings = (min_alphabet_size, max_alphabet_size, background_fraction, val_fraction, split_seed)
        self.variation = variation
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"kanjivg": metadata.version("kanjivg")}

    def render_settings(self) -> dict[str, Any]:
        return {"render": RENDER_VERSION, "kanjivg": metadata.version("kanjivg"), "size": self.image_size,
                "drawers": self.drawers, "classes": self.num_classes, "split": self.split_settings,
                "variation": self.variation}

    def render(self, cache: Path) -> dict[str, np.ndarray]:
        glyphs = read_glyphs(kanjivg_dir())
        splits = split_alphabets(glyphs, self.num_classes, *self.split_settings)
        style = DrawerStyle().scaled(self.variation)
        arrays: dict[str, np.ndarray] = {}
        # Once per setting (~25 s for all 1,623 classes); on a terminal only: a captured run keeps its one-line
        # errors, and a log file no stream of carriage returns.
        progress = tqdm(total=sum(map(len, splits.values())), desc=f"rendering kanji once into {cache.parent}",
                        unit="class", disable=None)
        for split, members in splits.items():
            images = np.empty((len(members) * self.drawers, 1, self.image_size, self.image_size), np.uint8)
            for c, glyph in enumerate(members):
                strokes = glyph.strokes()
                for d in range(self.drawers):  # seeded by glyph and drawer: the same images on every machine
                    rng = np.random.default_rng([int(glyph.code, 16), d])
                    images[c * self.drawers + d, 0] = render(strokes, self.image_size, rng, style)
                progress.update()
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = np.repeat(np.arange(len(members)), self.drawers)
            arrays[f"{split}_classes"] = np.array([f"{g.alphabet}/{g.code}" for g in members])
        progress.close()
        return arrays
