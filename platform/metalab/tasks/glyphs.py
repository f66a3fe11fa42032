"""Offline few-shot family of printed glyphs of many scripts, rendered from the fonts matplotlib ships.

Each character (code point) is a class and its Unicode block its alphabet: Latin, Greek, Cyrillic, Armenian,
Hebrew, Arabic, Georgian, Lao, Canadian syllabics, Braille, arrows, mathematical operators, box drawing,
dingbats, ... (:data:`BLOCKS`). A class's examples, its "drawers", cycle over the typefaces that draw it
(DejaVu Sans, Serif and Sans Mono and STIX General, four weights/slants each), each drawn with seeded jitter
(rotation, shear, scale, shift, stroke width), so printed glyphs vary as Omniglot's handwriting does. As in
:mod:`metalab.tasks.kanji`, the train/val/test split is by alphabet. See :class:`PrintedGlyphs`.
DejaVu fonts: Bitstream Vera licence, DejaVu changes public domain; STIX fonts: SIL Open Font License 1.1
(see NOTICE).
"""

from __future__ import annotations

import bisect
import math
import unicodedata
from dataclasses import astuple, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metalab.errors import ConfigError
from metalab.tasks.kanji import split_alphabets
from metalab.tasks.rendered import RenderedFamily, check_render_settings, default_cache_dir

if TYPE_CHECKING:  # matplotlib is imported when glyphs are rendered: ~0.4 s that other families' jobs need not wait
    from matplotlib.ft2font import FT2Font

RENDER_VERSION = 1  # bump when rendering, the block table or the selection of classes changes: stale caches go
SUPERSAMPLE = 2  # glyphs are placed and jittered at 2× the image size, then box-downsampled: anti-aliased
EM_FRACTION = 0.8  # an em spans 80% of the image side: a capital is ~0.58 of it, a lower-case x ~0.44
FIT_FRACTION = 0.85  # a glyph larger than 85% of the side (a long arrow, a full block) is shrunk to fit
SAME_GLYPH = 0.05  # relative squared distance ‖a − b‖² / (‖a‖² + ‖b‖²) below which two classes look the same
MIN_INK = 2.0  # a glyph whose image holds less ink than 2 full pixels is blank
_CHUNK = 32  # characters rendered and compared at once: a block stops at most 31 renders past its last class
# Classes are letters, digits and symbols: no marks (combining accents), punctuation, spaces or controls, nor
# modifier letters and symbols (ʰ, ˘: small raised copies of other glyphs).
CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo", "Nd", "Nl", "No", "Sm", "Sc", "So"})
# The text faces matplotlib ships with a Unicode character map. Its Computer Modern files (cm*.ttf) map code
# points to TeX font positions (cmex10's "A" is a delimiter), STIXSiz*/STIXNonUni* hold size variants and
# private-use glyphs, DejaVu*Display a handful of glyphs, LastResort a placeholder box for every code point.
SUPPORTED_TYPEFACES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)

# The Unicode blocks (Unicode 15, Blocks.txt) classes are drawn from: (first, last, name). The fonts above draw
# letters, digits or symbols of each in at least four faces; blocks left out hold mostly accented letters
# (Latin Extended Additional, Greek Extended: precomposed, left out below) or are drawn by fewer faces (NKo,
# Ogham, Tifinagh).
BLOCKS = (
    (0x0000, 0x007F, "Basic Latin"), (0x0080, 0x00FF, "Latin-1 Supplement"), (0x0100, 0x017F, "Latin Extended-A"),
    (0x0180, 0x024F, "Latin Extended-B"), (0x0250, 0x02AF, "IPA Extensions"), (0x0370, 0x03FF, "Greek and Coptic"),
    (0x0400, 0x04FF, "Cyrillic"), (0x0500, 0x052F, "Cyrillic Supplement"), (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0E80, 0x0EFF, "Lao"), (0x10A0, 0x10FF, "Georgian"),
    (0x1400, 0x167F, "Unified Canadian Aboriginal Syllabics"), (0x1D00, 0x1D7F, "Phonetic Extensions"),
    (0x20A0, 0x20CF, "Currency Symbols"), (0x2100, 0x214F, "Letterlike Symbols"), (0x2190, 0x21FF, "Arrows"),
    (0x2200, 0x22FF, "Mathematical Operators"), (0x2300, 0x23FF, "Miscellaneous Technical"),
    (0x2500, 0x257F, "Box Drawing"), (0x2580, 0x259F, "Block Elements"), (0x25A0, 0x25FF, "Geometric Shapes"),
    (0x2600, 0x26FF, "Miscellaneous Symbols"), (0x2700, 0x27BF, "Dingbats"), (0x27F0, 0x27FF, "Supplemental Arrows-A"),
    (0x2800, 0x28FF, "Braille Patterns"), (0x2900, 0x297F, "Supplemental Arrows-B"),
    (0x2A00, 0x2AFF, "Supplemental Mathematical Operators"), (0x2B00, 0x2BFF, "Miscellaneous Symbols and Arrows"),
    (0x2C60, 0x2C7F, "Latin Extended-C"), (0x2D00, 0x2D2F, "Georgian Supplement"),
    (0xA640, 0xA69F, "Cyrillic Extended-B"), (0xA720, 0xA7FF, "Latin Extended-D"), (0x10300, 0x1032F, "Old Italic"),
    (0x1D300, 0x1D35F, "Tai Xuan Jing Symbols"), (0x1F600, 0x1F64F, "Emoticons"),
)
_FIRSTS = [first for first, _, _ in BLOCKS]
_ORDER = {block: index for index, (_, _, block) in enumerate(BLOCKS)}


@dataclass
class Glyph:
    point: int  # its code point
    alphabet: str  # its Unicode block
    faces: tuple[int, ...]  # the typefaces (indices into the family's) that draw it

    @property
    def name(self) -> str:
        return f"{self.alphabet}/U+{self.point:04X}"


@dataclass(frozen=True)
class JitterStyle:
    """How much drawers of one typeface differ: degrees, ratios of the image side, supersampled pixels."""

    rotation_degrees: float = 8.0  # rotation ~ U[−r, r]
    shear: float = 0.12  # shear ~ U[−s, s]
    scale_spread: float = 0.1  # scale ~ U[1 − s, 1 + s]
    shift: float = 0.05  # translation ~ U[−s, s] of the side, each axis
    pen: float = 2.0  # strokes grown by 0..round(p) supersampled pixels (½ pixel each; never thinned: hairlines stay)

    def scaled(self, factor: float) -> JitterStyle:
        """Every variation times ``factor`` (0: the drawers of one typeface identical)."""
        return JitterStyle(*(value * factor for value in astuple(self)))


def font_dir() -> Path:
    """matplotlib's TrueType fonts (``mpl-data/fonts/ttf``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def block_of(point: int) -> str | None:
    """The :data:`BLOCKS` name holding ``point``, ``None`` for a code point outside them."""
    index = bisect.bisect_right(_FIRSTS, point) - 1
    return BLOCKS[index][2] if index >= 0 and point <= BLOCKS[index][1] else None


def is_base_character(point: int) -> bool:
    """A letter, digit or symbol (:data:`CATEGORIES`) with no decomposition: precomposed (é = e + ´) and
    compatibility (², ℌ, ①) characters are variants of another character, as Omniglot has none."""
    char = chr(point)
    return unicodedata.category(char) in CATEGORIES and not unicodedata.decomposition(char)


def ink(font: FT2Font, point: int) -> Image.Image | None:
    """``point``'s glyph in ``font`` at the font's set size, cropped to its ink (grey, ink bright); ``None`` if it
    has none."""
    from matplotlib.ft2font import LoadFlags

    glyph = font.load_char(point, flags=LoadFlags.NO_HINTING)  # outlines as designed: hinting is for screen sizes
    left, bottom, right, top = (value // 64 for value in glyph.bbox)  # 26.6 fixed point → whole pixels, floored
    image = np.zeros((top - bottom + 3, right - left + 3), np.uint8)
    font.draw_glyph_to_bitmap(image, 1 - left, 1, glyph, antialiased=True)  # its bitmap's left edge lands at x + left
    rows, cols = np.nonzero(image.any(1))[0], np.nonzero(image.any(0))[0]
    if not len(rows):
        return None
    return Image.fromarray(image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def _fit(glyph: Image.Image, canvas: int) -> float:
    """The shrink that fits a glyph larger than :data:`FIT_FRACTION` of the canvas (1: none)."""
    return min(1.0, FIT_FRACTION * canvas / max(glyph.size))


def plain(glyph: Image.Image, size: int) -> np.ndarray:
    """A glyph's ink centred in a (size, size) image without jitter, uint8: a cheap stand-in for :func:`place` with
    no jitter (shrunk before it is centred, so to the nearest pixel), to compare classes and find blanks."""
    shrink = _fit(glyph, size * SUPERSAMPLE) / SUPERSAMPLE
    small = glyph.resize((max(1, round(glyph.width * shrink)), max(1, round(glyph.height * shrink))),
                         Image.Resampling.BOX)
    image = Image.new("L", (size, size))
    image.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    return np.array(image)


@dataclass(frozen=True)
class Jitter:
    """One drawer's variation of a glyph."""

    angle: float = 0.0  # radians
    shear: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # of the image side, x and y
    pen: int = 0  # supersampled pixels the strokes grow by (see thicken)

    @classmethod
    def draw(cls, rng: np.random.Generator, style: JitterStyle) -> Jitter:
        shift_x, shift_y = rng.uniform(-style.shift, style.shift, 2)
        return cls(angle=math.radians(rng.uniform(-style.rotation_degrees, style.rotation_degrees)),
                   shear=rng.uniform(-style.shear, style.shear),
                   scale=rng.uniform(1 - style.scale_spread, 1 + style.scale_spread),
                   shift=(shift_x, shift_y), pen=int(rng.integers(0, round(style.pen) + 1)))


def thicken(glyph: Image.Image, pen: int) -> Image.Image:
    """The glyph with its strokes grown by ``pen`` pixels: ``pen`` 2×2 maximum filters, alternately towards the
    lower right and the upper left, so the ink stays centred (PIL's ``MaxFilter`` is ~20× slower)."""
    if not pen:
        return glyph
    image = np.pad(np.asarray(glyph), pen)
    for step in range(pen):
        grown = image.copy()
        into, source = (slice(1, None), slice(None, -1)) if step % 2 == 0 else (slice(None, -1), slice(1, None))
        np.maximum(grown[into], image[source], out=grown[into])
        np.maximum(grown[:, into], grown[:, source].copy(), out=grown[:, into])
        image = grown
    return Image.fromarray(image)


def place(glyph: Image.Image, size: int, jitter: Jitter) -> np.ndarray:
    """A glyph's ink (supersampled) rotated, sheared, scaled and centred, then shifted, in a (size, size) image:
    uint8, ink bright on a dark ground, as :func:`metalab.tasks.strokes.render`. The pen is :func:`thicken`'s."""
    canvas = size * SUPERSAMPLE
    shrink = 1 / (_fit(glyph, canvas) * jitter.scale)
    cos, sin, shear = math.cos(jitter.angle), math.sin(jitter.angle), jitter.shear
    # The glyph goes to the image by fit·scale·rotation·[[1, shear], [0, 1]] about the centres; PIL's affine
    # transform wants the inverse, [[1, −shear], [0, 1]]·rotationᵀ / (fit·scale): for each output pixel (x, y),
    # the input pixel (a x + b y + c, d x + e y + f).
    a, b, d, e = shrink * (cos + shear * sin), shrink * (sin - shear * cos), -shrink * sin, shrink * cos
    x, y = canvas / 2 + jitter.shift[0] * canvas, canvas / 2 + jitter.shift[1] * canvas
    data = (a, b, glyph.width / 2 - a * x - b * y, d, e, glyph.height / 2 - d * x - e * y)
    image = glyph.transform((canvas, canvas), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
    return np.asarray(image.reduce(SUPERSAMPLE))


def survey(faces: list[FT2Font], size: int, min_typefaces: int, min_alphabet_size: int, max_alphabet_size: int,
           progress: tqdm | None = None) -> tuple[list[Glyph], dict[tuple[int, int], Image.Image]]:
    """The classes the typefaces give, block by block in :data:`BLOCKS` order, and each class's ink per typeface
    (keyed ``(point, face)``).

    A class is a base character (:func:`is_base_character`) of a listed block that at least ``min_typefaces`` of
    ``faces`` draw with ink, and whose plain (unjittered, :func:`plain`) image differs from every earlier class's in
    each typeface both are drawn in: of Latin A, Greek Alpha and Cyrillic A, or of a box-drawing stroke and its
    mirror (alike once centred), the first is kept, so classes are told apart by their shapes, not their code
    points. A block's characters are taken in order, letters first, then digits, then symbols, each by code point,
    up to ``max_alphabet_size`` classes; a block left with fewer than ``min_alphabet_size`` is dropped whole.
    Rendering stops at a block's last class, so the time taken grows with the classes, not with the fonts.
    """
    kinds = {"L": 0, "N": 1, "S": 2}
    drawn_by: dict[int, list[int]] = {}
    for index, font in enumerate(faces):
        for point, glyph_index in font.get_charmap().items():
            if glyph_index and block_of(point) and is_base_character(point):
                drawn_by.setdefault(point, []).append(index)
    by_block: dict[str, list[int]] = {}
    for point in sorted((p for p, indices in drawn_by.items() if len(indices) >= min_typefaces),
                        key=lambda p: (_ORDER[block_of(p)], kinds[unicodedata.category(chr(p))[0]], p)):
        by_block.setdefault(block_of(point) or "", []).append(point)
    if progress is not None:
        progress.reset(total=len(by_block))
    # Per typeface, the plain images of the classes kept so far, (capacity, size²) filled up to count[face].
    seen = [torch.empty((sum(index in faces_of for faces_of in drawn_by.values()), size * size))
            for index in range(len(faces))]
    count = [0] * len(faces)
    glyphs: list[Glyph] = []
    inks: dict[tuple[int, int], Image.Image] = {}
    for block, points in by_block.items():
        at_start, taken = count.copy(), []
        for first in range(0, len(points), _CHUNK):
            if len(taken) == max_alphabet_size:
                break
            chunk = _render_chunk(faces, points[first:first + _CHUNK], drawn_by, size, min_typefaces)
            like_seen, like_earlier = _look_alike(chunk, seen, count)
            accepted: set[int] = set()
            for point, drawn in chunk.items():
                if len(taken) == max_alphabet_size:
                    break
                if point in like_seen or like_earlier.get(point, set()) & accepted:
                    continue
                accepted.add(point)
                taken.append(Glyph(point, block, tuple(drawn)))
                for face, (glyph, image) in drawn.items():
                    seen[face][count[face]] = torch.from_numpy(image).flatten() / 255
                    count[face] += 1
                    inks[point, face] = glyph
        if len(taken) >= min_alphabet_size:
            glyphs.extend(taken)
        else:  # too small an alphabet: forget its classes, so they exclude no later one
            count = at_start
            for glyph in taken:
                for face in glyph.faces:
                    del inks[glyph.point, face]
        if progress is not None:
            progress.update()
    return glyphs, inks


def _render_chunk(faces: list[FT2Font], points: list[int], drawn_by: dict[int, list[int]], size: int,
                  min_typefaces: int) -> dict[int, dict[int, tuple[Image.Image, np.ndarray]]]:
    """Each point's ink and plain image per typeface that draws it with ink, for points drawn by enough faces."""
    chunk = {}
    for point in points:
        drawn = {}
        for face in drawn_by[point]:
            glyph = ink(faces[face], point)
            if glyph is not None:
                image = plain(glyph, size)
                if int(image.sum(dtype=np.int64)) >= MIN_INK * 255:
                    drawn[face] = (glyph, image)
        if len(drawn) >= min_typefaces:
            chunk[point] = drawn
    return chunk


def _look_alike(chunk: dict[int, dict[int, tuple[Image.Image, np.ndarray]]], seen: list[torch.Tensor],
                count: list[int]) -> tuple[set[int], dict[int, set[int]]]:
    """The chunk's points that look like a kept class in some typeface, and per point the earlier points of the
    chunk it looks like; "alike": relative squared distance ‖a − b‖² / (‖a‖² + ‖b‖²) below :data:`SAME_GLYPH`."""
    like_seen: set[int] = set()
    like_earlier: dict[int, set[int]] = {}
    for face in range(len(seen)):
        members = [point for point, drawn in chunk.items() if face in drawn]
        if not members:
            continue
        images = torch.from_numpy(np.stack([chunk[point][face][1] for point in members])).flatten(1).float() / 255
        norms = (images * images).sum(1)  # (m,), images (m, size²)
        kept = seen[face][:count[face]]  # (k, size²)
        if len(kept):
            near = 2 * images @ kept.T > (1 - SAME_GLYPH) * (norms[:, None] + (kept * kept).sum(1)[None])  # (m, k)
            like_seen.update(point for point, alike in zip(members, near.any(1).tolist(), strict=True) if alike)
        near = 2 * images @ images.T > (1 - SAME_GLYPH) * (norms[:, None] + norms[None])  # (m, m)
        for i, j in torch.tril(near, diagonal=-1).nonzero().tolist():
            like_earlier.setdefault(members[i], set()).add(members[j])
    return like_seen, like_earlier


class PrintedGlyphs(RenderedFamily):
    """Omniglot-like few-shot classification of printed characters of many scripts, offline.

    A class is a character, its alphabet its Unicode block (class names ``<block>/U+XXXX``, so
    ``sampler=meta_dataset`` draws a block first, as Meta-Dataset draws an Omniglot alphabet). Its ``drawers``
    images cycle over the typefaces that draw it, each with seeded jitter: drawer d of a class drawn by faces
    F₀..Fₙ₋₁ is face F_(d mod n), jittered by a generator seeded with (code point, d): the same settings render
    the same bytes (the cache key holds matplotlib's version, whose FreeType draws the glyphs). Which characters are
    classes: see :func:`survey` (base letters, digits and symbols of
    :data:`BLOCKS`, drawn by ``min_typefaces`` faces or more, near-duplicates across scripts dropped). The split
    is class- and alphabet-disjoint as :func:`metalab.tasks.kanji.split_alphabets` makes it: a block longer than
    ``max_alphabet_size`` gives its first characters (letters first). Scripts differ from Omniglot's in one way
    that matters: a script's shapes are shared across blocks (Latin Extended-B's letters are Latin letters with
    hooks and bars), so an unseen alphabet is often partly familiar, as kanji's is.

    With the defaults (matplotlib 3.11): 1,523 classes in 35 blocks, 752 / 135 / 636 in train / val / test (16 / 4
    / 15 blocks), rendered in 7-12 s on 2 CPU cores, loaded from the cache in < 0.1 s.

    Arguments: ``image_size`` (28 as Omniglot), ``drawers`` per class (20 as Omniglot), ``num_classes`` (a cap;
    the fonts give fewer than Omniglot's 1,623), ``background_fraction`` / ``val_fraction`` of classes for
    train+val / val, ``min_alphabet_size`` and ``max_alphabet_size`` (characters a block must have / may give),
    ``split_seed`` (which blocks go where), ``variation`` (scales the jitter; 0 = a class's drawers of one typeface
    identical), ``typefaces`` (font files of matplotlib's ``mpl-data/fonts/ttf``, of
    :data:`SUPPORTED_TYPEFACES`), ``min_typefaces`` (faces a character must be drawn by), ``cache_dir``
    (rendered images; ``None`` = ``$XDG_CACHE_HOME/metalab`` or ``~/.cache/metalab``). ``kwargs``:
    :class:`ImageClassFamily`'s episode settings and :class:`TaskFamily`'s.
    """

    name = "glyphs"

    def __init__(self, *, image_size: int = 28, drawers: int = 20, num_classes: int = 1623,
                 background_fraction: float = 0.6, val_fraction: float = 0.1, min_alphabet_size: int = 14,
                 max_alphabet_size: int = 55, split_seed: int = 0, variation: float = 1.0,
                 typefaces: list[str] | None = None, min_typefaces: int = 4,
                 cache_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_render_settings(image_size, drawers, num_classes, variation, min_alphabet_size, max_alphabet_size,
                              background_fraction, val_fraction)
        typefaces = list(SUPPORTED_TYPEFACES if typefaces is None else typefaces)
        unknown = [name for name in typefaces if name not in SUPPORTED_TYPEFACES]
        if unknown or not typefaces or len(set(typefaces)) < len(typefaces):
            raise ConfigError(f"task.typefaces must list distinct font files of {', '.join(SUPPORTED_TYPEFACES)}; "
                              f"got {typefaces}" + (f" ({', '.join(unknown)} not among them)" if unknown else ""))
        if not 1 <= min_typefaces <= len(typefaces):
            raise ConfigError(f"task.min_typefaces must be 1..{len(typefaces)} (the number of task.typefaces), "
                              f"got {min_typefaces}")
        self.image_size, self.drawers, self.num_classes = image_size, drawers, num_classes
        self.split_settings = (min_alphabet_size, max_alphabet_size, background_fraction, val_fraction, split_seed)
        self.variation, self.typefaces, self.min_typefaces = variation, typefaces, min_typefaces
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def data_description(self) -> dict[str, str]:
        return super().data_description() | {"matplotlib": metadata.version("matplotlib"),
                                             "typefaces": ",".join(self.typefaces)}

    def render_settings(self) -> dict[str, Any]:
        return {"render": RENDER_VERSION, "matplotlib": metadata.version("matplotlib"), "size": self.image_size,
                "drawers": self.drawers, "classes": self.num_classes, "split": self.split_settings,
                "variation": self.variation, "typefaces": self.typefaces, "min_typefaces": self.min_typefaces}

    def render(self, cache: Path) -> dict[str, np.ndarray]:
        from matplotlib.ft2font import FT2Font

        faces = []
        for name in self.typefaces:
            font = FT2Font(str(font_dir() / name))
            font.set_size(EM_FRACTION * self.image_size * SUPERSAMPLE, 72)  # points at 72 dpi: pixels per em
            faces.append(font)
        # Once per setting; progress bars on a terminal only, as kanji's.
        with tqdm(desc=f"choosing the characters of {len(faces)} typefaces", unit="block",
                  disable=None) as progress:
            threads = torch.get_num_threads()
            # One thread: the survey's many small matrix products only wait on their threads' hand-offs, up to 20×
            # slower on a busy machine (numpy's OpenBLAS likewise, hence torch, whose threads can be set).
            torch.set_num_threads(1)
            try:
                glyphs, inks = survey(faces, self.image_size, self.min_typefaces, *self.split_settings[:2], progress)
            finally:
                torch.set_num_threads(threads)
        blocks = len({glyph.alphabet for glyph in glyphs})
        if blocks < 3:
            raise ConfigError(f"task.typefaces give {blocks} Unicode blocks of task.min_alphabet_size="
                              f"{self.split_settings[0]} characters or more drawn by task.min_typefaces="
                              f"{self.min_typefaces} of them; train, val and test need one each: add typefaces or "
                              "lower task.min_typefaces or task.min_alphabet_size")
        # Shares are of the classes there are: a cap above them would leave train short and test long. Any object
        # with an .alphabet will do for split_alphabets, kanji's Glyph or this module's.
        splits = split_alphabets(glyphs, min(self.num_classes, len(glyphs)),  # type: ignore[arg-type]
                                 *self.split_settings)
        style = JitterStyle().scaled(self.variation)
        arrays: dict[str, np.ndarray] = {}
        progress = tqdm(total=sum(map(len, splits.values())), desc=f"rendering glyphs once into {cache.parent}",
                        unit="class", disable=None)
        for split, members in splits.items():
            images = np.empty((len(members) * self.drawers, 1, self.image_size, self.image_size), np.uint8)
            for c, glyph in enumerate(members):
                thickened: dict[tuple[int, int], Image.Image] = {}  # (face, pen) → the glyph's ink
                for d in range(self.drawers):  # seeded by code point and drawer: the same images on every machine
                    face = glyph.faces[d % len(glyph.faces)]
                    jitter = Jitter.draw(np.random.default_rng([glyph.point, d]), style)
                    if (face, jitter.pen) not in thickened:
                        thickened[face, jitter.pen] = thicken(inks[glyph.point, face], jitter.pen)
                    images[c * self.drawers + d, 0] = place(thickened[face, jitter.pen], self.image_size, jitter)
                progress.update()
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = np.repeat(np.arange(len(members)), self.drawers)
            arrays[f"{split}_classes"] = np.array([glyph.name for glyph in members])
        progress.close()
        return arrays
