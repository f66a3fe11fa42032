"""Stroke-order glyphs as cubic Bézier paths, and their rendering with per-"drawer" variation.

A KanjiVG stroke is an SVG path of cubic Béziers (``M/m``, ``C/c``, ``S/s``; ``L/l`` handled too) on a
109×109 canvas. A drawer is a seeded variation of the whole glyph, in the spirit of Omniglot's 20
people drawing each character: control points jittered, each stroke offset, the glyph rotated, scaled
and sheared, and a pen width of its own.
"""

from __future__ import annotations

import re
from dataclasses import astuple, dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 109.0  # KanjiVG's viewBox
SUPERSAMPLE = 4  # draw at 4× the target size, then downsample: anti-aliased strokes
_TOKEN = re.compile(r"[MmCcSsLlZz]|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

Stroke = np.ndarray  # (segments, 4, 2): the control points of each cubic Bézier segment


def parse_path(d: str) -> Stroke:
    """An SVG path of one stroke → its cubic segments in absolute canvas coordinates."""
    tokens = _TOKEN.findall(d)
    segments: list[np.ndarray] = []
    position = np.zeros(2)
    start = np.zeros(2)
    last_control: np.ndarray | None = None
    command = ""
    index = 0

    def numbers(count: int) -> np.ndarray:
        nonlocal index
        values = np.array([float(v) for v in tokens[index:index + count]]).reshape(-1, 2)
        index += count
        return values

    while index < len(tokens):
        if tokens[index].isalpha():
            command = tokens[index]
            index += 1
            if command in "Zz":
                if not np.allclose(position, start):
                    segments.append(np.stack([position, position, start, start]))
                position = start.copy()
                continue
        relative = command.islower()
        origin = position if relative else np.zeros(2)
        kind = command.upper()
        if kind == "M":
            position = numbers(2)[0] + origin
            start = position.copy()
            command = "l" if relative else "L"  # further pairs after M are line-tos
            last_control = None
        elif kind == "L":
            end = numbers(2)[0] + origin
            segments.append(np.stack([position, position, end, end]))
            position, last_control = end, None
        elif kind == "C":
            c1, c2, end = numbers(6) + origin
            segments.append(np.stack([position, c1, c2, end]))
            position, last_control = end, c2
        elif kind == "S":
            c2, end = numbers(4) + origin
            c1 = 2 * position - last_control if last_control is not None else position
            segments.append(np.stack([position, c1, c2, end]))
            position, last_control = end, c2
        else:
            raise ValueError(f"unsupported SVG path command {command!r} in {d!r}")
    if not segments:
        raise ValueError(f"empty SVG path {d!r}")
    return np.stack(segments)


@dataclass(frozen=True)
class DrawerStyle:
    """How much drawers differ, in units of the 109-wide canvas, degrees and ratios."""

    control_jitter: float = 1.2  # σ of each Bézier control point
    stroke_offset: float = 2.0  # σ of each stroke's shift
    rotation_degrees: float = 8.0  # rotation ~ U[−r, r]
    shear: float = 0.12  # shear ~ U[−s, s]
    scale_spread: float = 0.1  # scale ~ U[0.95 − s, 0.95 + s]
    pen_width_spread: float = 1.25  # pen width ~ U[4.25 − s, 4.25 + s]

    def scaled(self, factor: float) -> DrawerStyle:
        """Every variation times ``factor`` (0: all drawers identical)."""
        return DrawerStyle(*(value * factor for value in astuple(self)))


_T = np.linspace(0.0, 1.0, 12)
_BERNSTEIN = np.stack([(1 - _T) ** 3, 3 * (1 - _T) ** 2 * _T, 3 * (1 - _T) * _T**2, _T**3], axis=1)  # (12, 4)


def render(strokes: list[Stroke], size: int, rng: np.random.Generator, style: DrawerStyle) -> np.ndarray:
    """One drawer's rendering of a glyph: uint8 (size, size), ink bright on a dark ground."""
    angle = np.deg2rad(rng.uniform(-style.rotation_degrees, style.rotation_degrees))
    scale = rng.uniform(0.95 - style.scale_spread, 0.95 + style.scale_spread)
    shear = rng.uniform(-style.shear, style.shear)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    affine = scale * rotation @ np.array([[1.0, shear], [0.0, 1.0]])
    centre = np.array([CANVAS / 2, CANVAS / 2])
    pixels = size * SUPERSAMPLE / CANVAS
    pen = max(1, round(rng.uniform(4.25 - style.pen_width_spread, 4.25 + style.pen_width_spread) * pixels))

    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        controls = stroke + rng.normal(0.0, style.control_jitter, stroke.shape)
        controls = controls + rng.normal(0.0, style.stroke_offset, 2)
        points = np.einsum("tk,skd->std", _BERNSTEIN, controls).reshape(-1, 2)  # (segments·12, 2)
        points = ((points - centre) @ affine.T + centre) * pixels
        draw.line([tuple(p) for p in points], fill=255, width=pen, joint="curve")
        radius = pen / 2  # round caps, as KanjiVG's stroke-linecap
        for x, y in (points[0], points[-1]):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
