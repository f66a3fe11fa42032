"""One source of Meta-Dataset (Triantafillou et al., ICLR 2020) as its conversion scripts write it, read
without TensorFlow.

``meta_dataset/dataset_conversion/dataset_to_records.py`` (google-research/meta-dataset) writes, per source,
``<records_root>/<source>/dataset_spec.json`` and one TFRecord file per class, ``<class_id>.tfrecords``, whose
records are ``tf.train.Example``\\ s holding ``image`` (an encoded JPEG, RGB) and ``label`` (the class id).
Class ids run over the splits in order: the train classes first, then the validation ones, then the test
ones. ``dataset_spec.json`` is ``DatasetSpecification.to_dict()`` (``meta_dataset/data/dataset_spec.py``), one of:

* ``DatasetSpecification``: ``classes_per_split`` ({"TRAIN": n, "VALID": n, "TEST": n}), ``images_per_class``
  and ``class_names`` keyed by class id (as a string), ``file_pattern`` ``"{}.tfrecords"``;
* ``BiLevelDatasetSpecification`` (Omniglot): ``superclasses_per_split``, ``classes_per_superclass``,
  ``superclass_names``; a split's superclasses, and a superclass's classes, have consecutive ids;
* ``HierarchicalDatasetSpecification`` (ILSVRC-2012): ``split_subgraphs`` (per split, the WordNet DAG as
  nodes ``{wn_id, words, children_ids, parents_ids}``; its leaves are the split's classes), ``class_names``
  (class id → WordNet id), ``images_per_class`` (per split, WordNet id → images under that node).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from metalab.errors import ConfigError, DataMissingError
from metalab.schema_cache import cache_folder
from metalab.tasks.classification import SPLITS
from metalab.tasks.images import ImageClassFamily, LabelledImages
from metalab.tasks.tfrecords import Example, read_record, record_spans

LAYOUT = "<root>/<source>/dataset_spec.json and one <class_id>.tfrecords per class, as Meta-Dataset's conversion writes"
SPEC_SPLITS = {"train": "TRAIN", "val": "VALID", "test": "TEST"}  # metalab's split → Meta-Dataset's Split name
FILE_PATTERN = "{}.tfrecords"
INDEX_VERSION = 1  # bump when the index's content changes, so stale caches are not reused
DECODE_VERSION = 1  # bump when decoding or resizing changes


@dataclass(frozen=True)
class SourceSpec:
    """What metalab needs of a ``dataset_spec.json``: each split's class ids, each class's name (``superclass/class``
    for a bi-level spec) and image count."""

    kind: str  # the spec's __class__
    classes: dict[str, list[int]]  # metalab split → class ids, ascending
    names: dict[int, str]
    images: dict[int, int]
    # Hierarchical specs: per split, for each internal node of its graph (by WordNet id), the class ids of the leaves
    # it spans (by WordNet id), as Meta-Dataset's sampler orders them.
    spans: dict[str, list[list[int]]] | None = None


def spanned_leaves(graph: list[dict]) -> dict[str, set[str]]:
    """Each internal node's (WordNet id's) leaves, reached through ``children_ids`` within the split's graph."""
    children = {node["wn_id"]: node["children_ids"] for node in graph}
    found: dict[str, set[str]] = {}

    def leaves_of(wn_id: str) -> set[str]:
        if wn_id not in found:
            below = children.get(wn_id, [])
            found[wn_id] = set().union(*map(leaves_of, below)) if below else {wn_id}
        return found[wn_id]

    return {wn_id: leaves_of(wn_id) for wn_id, below in children.items() if below}


def read_spec(path: Path) -> SourceSpec:
    """Parse a ``dataset_spec.json``; one line naming the file on anything unexpected."""
    try:
        spec = json.loads(path.read_text())
        kind = spec["__class__"]
        if spec["file_pattern"] != FILE_PATTERN:
            raise ConfigError(f"{path}: file_pattern {spec['file_pattern']!r} is not read (shards or example-level "
                              f"pools); metalab reads one {FILE_PATTERN!r} file per class")
        names = {int(key): str(name).replace("/", "_") for key, name in spec["class_names"].items()}  # '/' is ours
        if kind == "DatasetSpecification":
            counts = [int(spec["classes_per_split"][SPEC_SPLITS[split]]) for split in SPLITS]
            starts = np.cumsum([0, *counts])
            classes = {split: list(range(starts[i], starts[i + 1])) for i, split in enumerate(SPLITS)}
            images = {int(key): int(count) for key, count in spec["images_per_class"].items()}
        elif kind == "BiLevelDatasetSpecification":
            per_superclass = {int(key): int(count) for key, count in spec["classes_per_superclass"].items()}
            counts = [int(spec["superclasses_per_split"][SPEC_SPLITS[split]]) for split in SPLITS]
            superclasses = np.cumsum([0, *counts])
            first_class = np.cumsum([0, *(per_superclass[s] for s in range(len(per_superclass)))])
            classes, labelled = {}, {}
            for i, split in enumerate(SPLITS):
                classes[split] = list(range(first_class[superclasses[i]], first_class[superclasses[i + 1]]))
                for superclass in range(superclasses[i], superclasses[i + 1]):
                    group = str(spec["superclass_names"][str(superclass)]).replace("/", "_")
                    for class_id in range(first_class[superclass], first_class[superclass + 1]):
                        labelled[class_id] = f"{group}/{names[class_id]}"
            names = labelled
            images = {int(key): int(count) for key, count in spec["images_per_class"].items()}
        elif kind == "HierarchicalDatasetSpecification":
            ids = {name: class_id for class_id, name in names.items()}
            classes, images, spans = {}, {}, {}
            for split in SPLITS:
                graph, counts_under = spec["split_subgraphs"][SPEC_SPLITS[split]], spec["images_per_class"][
                    SPEC_SPLITS[split]]
                leaves = [node["wn_id"] for node in graph if not node["children_ids"]]
                classes[split] = sorted(ids[leaf] for leaf in leaves)
                images |= {ids[leaf]: int(counts_under[leaf]) for leaf in leaves}
                spans[split] = [[ids[leaf] for leaf in sorted(leaves_under)]
                                for _, leaves_under in sorted(spanned_leaves(graph).items())]
        else:
            raise ConfigError(f"{path}: __class__ {kind!r} is none of DatasetSpecification, "
                              "BiLevelDatasetSpecification, HierarchicalDatasetSpecification")
        classes = {split: [int(c) for c in ids] for split, ids in classes.items()}
        unnamed = next((c for ids in classes.values() for c in ids if c not in names or c not in images), None)
        if unnamed is not None:
            raise ConfigError(f"{path}: class {unnamed} of its splits is missing from class_names or images_per_class")
        return SourceSpec(kind, classes, names, images, spans if kind == "HierarchicalDatasetSpecification" else None)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path} is not a Meta-Dataset dataset_spec.json ({type(error).__name__}: {error}); "
                          f"expected {LAYOUT}") from None


def decode_image(data: bytes, size: int, mode: str) -> np.ndarray:
    """A record's image as uint8 (C, size, size): decoded by PIL, converted to ``mode`` ("RGB" or "L"), resized as
    Meta-Dataset's ``ImageDecoder`` does (bilinear, ``align_corners=True``, no antialiasing; then rounded)."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.array(image.convert(mode), dtype=np.uint8)  # a writable copy, for torch
    array = array[:, :, None] if array.ndim == 2 else array  # (H, W, C)
    if array.shape[:2] != (size, size):
        resized = F.interpolate(torch.from_numpy(array).permute(2, 0, 1)[None].float(), size=(size, size),
                                mode="bilinear", align_corners=True)[0]
        return resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return array.transpose(2, 0, 1)


class RecordImages:
    """The images of one split, decoded from their records when indexed: ``store[indices]`` (a LongTensor of
    image indices) is uint8 (n, C, size, size). Holds only where each record lies (file, offset, length), so a
    split of any size costs ~30 bytes an image in memory; each file is opened for the read and closed after."""

    def __init__(self, files: list[Path], classes: np.ndarray, file_of: np.ndarray, record_of: np.ndarray,
                 offsets: np.ndarray, lengths: np.ndarray, size: int, mode: str) -> None:
        self.files, self.classes = files, classes  # per file: its path and its class id (the records' label)
        self.file_of, self.record_of, self.offsets, self.lengths = file_of, record_of, offsets, lengths
        self.size, self.mode = size, mode

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self), 1 if self.mode == "L" else 3, self.size, self.size

    def __getitem__(self, indices: torch.Tensor | int) -> torch.Tensor:
        if isinstance(indices, int):
            return self[torch.tensor([indices])][0]
        indices = torch.as_tensor(indices).reshape(-1).numpy()
        images = np.empty((len(indices), *self.shape[1:]), np.uint8)
        order = np.argsort(self.file_of[indices], kind="stable")  # each file opened once
        descriptor, opened = -1, -1
        try:
            for position in order:
                index = indices[position]
                file = self.file_of[index]
                if file != opened:
                    if descriptor >= 0:
                        os.close(descriptor)
                    descriptor, opened = os.open(self.files[file], os.O_RDONLY), file
                images[position] = self._decode(descriptor, file, index)
        finally:
            if descriptor >= 0:
                os.close(descriptor)
        return torch.from_numpy(images)

    def _decode(self, descriptor: int, file: int, index: int) -> np.ndarray:
        path, record = self.files[file], int(self.record_of[index])
        data = read_record(descriptor, int(self.offsets[index]), int(self.lengths[index]), path, record)
        where = f"{path}: record {record}"
        try:
            features = Example.FromString(data).features.feature
            image, label = features["image"].bytes_list.value, features["label"].int64_list.value
        except DecodeError:
            raise ConfigError(f"{where} is not a tf.train.Example: convert the data again") from None
        if len(image) != 1 or len(label) != 1:
            raise ConfigError(f"{where} lacks an image (bytes) or a label (int64) feature: not Meta-Dataset's records")
        if label[0] != self.classes[file]:
            raise ConfigError(f"{where} has label {label[0]}, but the file is class {self.classes[file]}'s: "
                              "the files do not match dataset_spec.json")
        try:
            return decode_image(image[0], self.size, self.mode)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ConfigError(f"{where}: its image cannot be decoded ({error})") from None


class MetaDatasetSource(ImageClassFamily):
    """Few-shot classification on one Meta-Dataset source, read from ``<root>/<source>/`` (see the module
    docstring for the format), the splits being the spec's. Its name is the source's (``omniglot``,
    ``aircraft``, ``cu_birds``, ``dtd``, ``quickdraw``, ``fungi``, ``vgg_flower``, ``ilsvrc_2012``, ...).

    Images are decoded from their JPEG/PNG bytes by PIL, converted to ``channels`` (3: RGB, as Meta-Dataset; 1:
    grey) and resized to ``image_size`` (84, Meta-Dataset's) by bilinear interpolation as Meta-Dataset's decoder
    does. A bi-level spec's classes (Omniglot) are named ``superclass/class``, so ``sampler=meta_dataset`` draws
    an alphabet first; ILSVRC-2012's classes are its WordNet ids, an episode's classes those a node of its DAG spans.

    Every record is located once (file, offset, length and stored CRC, from the framing alone) and the index
    cached in ``cache_dir``. A source of at most ``max_in_memory`` images is decoded whole (and the decoded
    images cached there too, so later runs start at once); a larger one (ILSVRC-2012's 1.28 M images, QuickDraw's
    ~50 M) is served lazily: each image is read and decoded when an episode draws it (:class:`RecordImages`).
    ``cache_dir``: ``None`` = ``$XDG_CACHE_HOME/metalab`` (default ``~/.cache/metalab``). ``kwargs``:
    :class:`ImageClassFamily`'s episode settings and :class:`TaskFamily`'s.
    """

    def __init__(self, *, root: str | Path = "data/meta-dataset", source: str, image_size: int = 84,
                 channels: int = 3, max_in_memory: int = 100_000, cache_dir: str | Path | None = None,
                 **kwargs: Any) -> None:
        super().__init__(channels=channels, **kwargs)
        if not source or "/" in source:
            raise ConfigError(f"task.source must name one source folder under task.root, got {source!r}")
        if image_size < 1 or max_in_memory < 0:
            raise ConfigError(f"task.image_size >= 1 and task.max_in_memory >= 0 are needed; got {image_size}, "
                              f"{max_in_memory}")
        self.name, self.root, self.source = source, Path(root).expanduser(), source
        self.folder = self.root / source
        self.image_size, self.max_in_memory = image_size, max_in_memory
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_folder()
        self._spec: SourceSpec | None = None
        self._index: dict[str, np.ndarray] | None = None
        self._splits: dict[str, LabelledImages] = {}

    @property
    def lazy(self) -> bool:
        """Whether images are decoded when drawn (the source holds more than ``max_in_memory``)."""
        return len(self.index()["offsets"]) > self.max_in_memory

    def spec(self) -> SourceSpec:
        if self._spec is None:
            path = self.folder / "dataset_spec.json"
            if not path.is_file():
                raise DataMissingError(f"Meta-Dataset source {self.source!r} not found: no {path}; expected {LAYOUT} "
                                       f"(<root> is task.root={self.root}); set task.root to the records root")
            self._spec = read_spec(path)
        return self._spec

    def index(self) -> dict[str, np.ndarray]:
        """Where every record of the source lies, by class id ascending: ``class_ids``, ``counts`` per class;
        ``offsets``, ``lengths``, ``crcs`` (stored masked CRC-32C) per image. Cached, keyed by the spec and the
        files' names, sizes and modification times."""
        if self._index is None:
            spec, spec_path = self.spec(), self.folder / "dataset_spec.json"
            class_ids = sorted(c for split in SPLITS for c in spec.classes[split])
            key = hashlib.sha256(f"{INDEX_VERSION} {self.folder.resolve()}".encode() + spec_path.read_bytes())
            for class_id in class_ids:
                path = self._file(class_id)
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    raise DataMissingError(f"{path} not found: {spec_path} lists class {class_id} "
                                           f"({spec.names[class_id]}); expected {LAYOUT} under task.root={self.root}"
                                           ) from None
                key.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
            cache = self.cache_dir / f"meta-dataset-{self.source}-index-{key.hexdigest()[:16]}.npz"
            if cache.is_file():
                with np.load(cache) as stored:
                    self._index = dict(stored)
            else:
                self._index = self._build_index(class_ids, spec)
                _save_atomically(cache, lambda target: np.savez(target, **self._index))
        return self._index

    def _file(self, class_id: int) -> Path:
        return self.folder / FILE_PATTERN.format(class_id)

    def _build_index(self, class_ids: list[int], spec: SourceSpec) -> dict[str, np.ndarray]:
        spans = []
        for class_id in tqdm(class_ids, desc=f"indexing {self.folder} once", unit="class", disable=None):
            offsets, lengths, crcs = record_spans(self._file(class_id))
            # ILSVRC's converter skips unreadable images yet counts them: fewer records is allowed there only
            short = len(offsets) < spec.images[class_id] and spec.kind != "HierarchicalDatasetSpecification"
            if short or len(offsets) > spec.images[class_id] or not len(offsets):
                raise ConfigError(f"{self._file(class_id)} holds {len(offsets)} records but dataset_spec.json gives "
                                  f"class {class_id} {spec.images[class_id]} images: convert the source again")
            spans.append((offsets, lengths, crcs))
        return {"class_ids": np.array(class_ids, np.int64), "counts": np.array([len(s[0]) for s in spans], np.int64),
                "offsets": np.concatenate([s[0] for s in spans]), "lengths": np.concatenate([s[1] for s in spans]),
                "crcs": np.concatenate([s[2] for s in spans])}

    def load_split(self, split: str) -> LabelledImages:
        if split not in self._splits:
            spec, index = self.spec(), self.index()
            if not spec.classes[split]:
                given = ", ".join(f"{SPEC_SPLITS[s]} {len(spec.classes[s])}" for s in SPLITS)
                raise ConfigError(f"dataset_spec.json of {self.source} gives its {split} split no classes ({given}): "
                                  "Meta-Dataset holds this source out of that split; choose a source with classes in "
                                  "every split for task.source")
            store = self._store(split)
            counts = torch.from_numpy(index["counts"][np.searchsorted(index["class_ids"], spec.classes[split])])
            labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
            names = [spec.names[c] for c in spec.classes[split]]
            images = store if self.lazy else self._decoded(split, store)
            position = {class_id: i for i, class_id in enumerate(spec.classes[split])}
            hierarchy = None if spec.spans is None else [[position[c] for c in span] for span in spec.spans[split]]
            self._splits[split] = LabelledImages(images, labels, names, hierarchy)
        return self._splits[split]

    def _store(self, split: str) -> RecordImages:
        index, classes = self.index(), np.array(self.spec().classes[split], np.int64)
        rows = np.searchsorted(index["class_ids"], classes)
        starts = np.concatenate([[0], np.cumsum(index["counts"])])
        picked = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows])
        counts = index["counts"][rows]
        file_of = np.repeat(np.arange(len(rows), dtype=np.int32), counts)
        record_of = picked - np.repeat(starts[rows], counts)
        return RecordImages([self._file(int(c)) for c in classes], classes, file_of, record_of,
                            index["offsets"][picked], index["lengths"][picked], self.image_size,
                            "L" if self.channels == 1 else "RGB")

    def _decoded(self, split: str, store: RecordImages) -> torch.Tensor:
        """A split decoded whole, from the cache where an earlier run left it."""
        key = f"{self.digest()}-{DECODE_VERSION}"
        cache = self.cache_dir / f"meta-dataset-{self.source}-{split}-{key}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache))
        images = np.empty(store.shape, np.uint8)
        chunk = 1024
        for start in tqdm(range(0, len(store), chunk), desc=f"decoding {self.source} {split} once into {cache.parent}",
                          unit=f"{chunk} images", disable=None):
            images[start:start + chunk] = store[torch.arange(start, min(start + chunk, len(store)))].numpy()
        _save_atomically(cache, lambda target: np.save(target, images))
        return torch.from_numpy(images)

    def digest(self) -> str:
        """16 hex digits of a sha256 over the spec (less its machine-specific ``path``), every record's length and
        stored CRC-32C (a fingerprint of each encoded image, read from the framing: no image is read for it),
        ``image_size`` and the channels served."""
        spec = json.loads((self.folder / "dataset_spec.json").read_text())
        spec.pop("path", None)
        index = self.index()
        hasher = hashlib.sha256(json.dumps([spec, self.image_size, self.channels], sort_keys=True).encode())
        for key in ("counts", "lengths", "crcs"):
            hasher.update(index[key].astype("<i8").tobytes())
        return hasher.hexdigest()[:16]

    def data_description(self) -> dict[str, str]:
        spec = self.spec()
        counts = dict(zip(self.index()["class_ids"].tolist(), self.index()["counts"].tolist(), strict=True))
        described = {"name": self.name, "source_type": "local", "source": str(self.folder.resolve()),
                     "digest": self.digest(), "spec": spec.kind, "lazy": str(self.lazy).lower(),
                     "digest_of": "dataset_spec.json (less its path) and every record's length and stored CRC-32C, "
                                  "with image_size and channels"}
        for split in SPLITS:
            described |= {f"{split}_classes": str(len(spec.classes[split])),
                          f"{split}_images": str(sum(counts[c] for c in spec.classes[split]))}
        return described


def _save_atomically(path: Path, write: Any) -> None:
    """Write a cache file through a temporary name, so concurrent jobs never read a half-written one; a cache
    folder that cannot be written is no error (the data is then read again next time)."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
