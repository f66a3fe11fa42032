"""Reading image files (from disk or a zip) into the uint8 (N, C, H, W) arrays that tasks serve."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metalab.errors import ConfigError
from metalab.tasks.images import LabelledImages

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(source: Path | bytes, size: int, mode: str, invert: bool = False, name: str = "") -> np.ndarray:
    """One image as uint8 (C, size, size); ``mode`` "L" (grey) or "RGB"; ``invert`` for dark-on-light ink."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = image.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:  # its text repeats the path
        raise ConfigError(f"cannot read image {name or source}: not an image file PIL can identify; replace or "
                          "remove the file") from None
    except (OSError, SyntaxError) as error:  # truncated or corrupt data ("image file is truncated", "broken PNG file")
        raise ConfigError(f"cannot read image {name or source}: {error}; replace or remove the file") from None
    array = 255 - array if invert else array
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def stack_classes(classes: Sequence[tuple[str, Sequence[Path | bytes]]], size: int, mode: str,
                  invert: bool = False) -> LabelledImages:
    """``[(class name, [image sources])]`` → one split's LabelledImages, labels in the given class order."""
    images, labels = [], []
    for label, (name, sources) in enumerate(classes):
        for index, source in enumerate(sources):
            where = str(source) if isinstance(source, Path) else f"image {index + 1} of {name} (in a zip)"
            images.append(read_image(source, size, mode, invert, name=where))
            labels.append(label)
    channels = 1 if mode == "L" else 3
    stacked = np.stack(images) if images else np.empty((0, channels, size, size), np.uint8)
    return LabelledImages(torch.from_numpy(stacked), torch.tensor(labels, dtype=torch.long),
                          [name for name, _ in classes])
