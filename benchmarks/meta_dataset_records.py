"""Reading Meta-Dataset's records: images per second decoded from TFRecords (read, CRC, Example, JPEG, resize).

Run: .venv/bin/python benchmarks/meta_dataset_records.py [--images 600] [--size 84]

Writes three small sources in a temporary folder, in Meta-Dataset's format (RGB JPEG records, as its
conversion writes them): 28×28 (QuickDraw's size), 105×105 (Omniglot's) and 500×375 crops of scikit-learn's two
sample photos, re-encoded at quality 90 (about ImageNet's average image: ~400×350, ~110 KB). Then reads every
image the way an episode does (``RecordImages``, random order, batches of 100) and times each step of one image
alone. One process, one core; medians of the repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

import metalab  # noqa: F401  (quiet imports)
from metalab.tasks.meta_dataset_records import MetaDatasetSource, decode_image
from metalab.tasks.tfrecords import Example, crc32c, encode_example, write_records


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def images_of(kind: str, count: int, rng: np.random.Generator) -> list[bytes]:
    if kind == "photo 500x375":
        photos = load_sample_images().images  # (427, 640, 3) each
        crops = []
        for _ in range(count):
            photo = photos[rng.integers(len(photos))]
            top, left = rng.integers(0, 427 - 375), rng.integers(0, 640 - 500)
            crops.append(jpeg(np.ascontiguousarray(photo[top:top + 375, left:left + 500])))
        return crops
    side = 28 if kind.startswith("quickdraw") else 105
    return [jpeg(np.repeat(rng.integers(0, 2, (side, side, 1), dtype=np.uint8) * 255, 3, axis=2)) for _ in range(count)]


def write_source(root: Path, name: str, images: list[bytes], classes: int = 15) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    per_class = len(images) // classes
    for c in range(classes):
        write_records(folder / f"{c}.tfrecords", [encode_example({"image": image, "label": c})
                                                  for image in images[c * per_class:(c + 1) * per_class]])
    (folder / "dataset_spec.json").write_text(json.dumps({
        "__class__": "DatasetSpecification", "name": name, "classes_per_split": {"TRAIN": 5, "VALID": 5, "TEST": 5},
        "images_per_class": {str(c): per_class for c in range(classes)},
        "class_names": {str(c): f"class {c}" for c in range(classes)}, "path": "", "file_pattern": "{}.tfrecords"}))


def per_image(action, items: list, repeats: int = 3) -> float:
    """Median seconds per item of ``action`` over ``items``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            action(item)
        times.append((time.perf_counter() - start) / len(items))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="images per source (15 classes)")
    parser.add_argument("--size", type=int, default=84, help="image_size served")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"per image, ms (median of 3), image_size={args.size}; last column: images/s through RecordImages")
    print(f"{'source':>16} {'KB':>6} {'CRC':>6} {'Example':>8} {'decode+resize':>14} {'index/1k':>9} {'images/s':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("quickdraw 28x28", "omniglot 105x105", "photo 500x375"):
            images = images_of(kind, args.images, rng)
            name = kind.split()[0]
            write_source(Path(folder), name, images)
            records = [encode_example({"image": image, "label": 0}) for image in images]
            crc = per_image(crc32c, records)
            parse = per_image(Example.FromString, records)
            decode = per_image(lambda image: decode_image(image, args.size, "RGB"), images)
            family = MetaDatasetSource(root=folder, source=name, image_size=args.size, max_in_memory=0,
                                       cache_dir=str(Path(folder) / "cache"))
            start = time.perf_counter()
            family.index()
            index = (time.perf_counter() - start) / len(images) * 1000
            store = family.load_split("train").images
            order = torch.randperm(len(store))
            rates = []
            for _ in range(3):
                start = time.perf_counter()
                for batch in order.split(100):
                    store[batch]
                rates.append(len(store) / (time.perf_counter() - start))
            kilobytes = np.mean([len(r) for r in records]) / 1000
            print(f"{kind:>16} {kilobytes:6.1f} {crc * 1e3:6.3f} {parse * 1e3:8.3f} {decode * 1e3:14.3f} "
                  f"{index * 1e3:8.1f}ms {statistics.median(rates):9.0f}")


if __name__ == "__main__":
    main()
