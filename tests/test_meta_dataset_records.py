"""Meta-Dataset's converted sources read without TensorFlow: the TFRecord framing and CRC-32C, tf.train.Example
encoding, dataset_spec.json's three forms, corrupt and missing data, and episodes drawn from records.

The sources here are written as ``meta_dataset/dataset_conversion/dataset_to_records.py`` writes them: per
class a ``<class_id>.tfrecords`` of Examples {image: encoded bytes, label: int64}, class ids train first, then
validation, then test, and ``dataset_spec.json`` as ``DatasetSpecification.to_dict()`` dumps it (indent 2).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalab.errors import ConfigError, DataMissingError
from metalab.tasks import MetaDatasetSource
from metalab.tasks import meta_dataset_records as records_module
from metalab.tasks.classification import SPLITS
from metalab.tasks.meta_dataset_records import RecordImages, decode_image
from metalab.tasks.tfrecords import (
    crc32c,
    decode_example,
    encode_example,
    frame,
    masked_crc32c,
    read_records,
    record_spans,
    write_records,
)
from tests.conftest import run_cli

SIZE = 12  # pixels a side of the written images


def pixels(class_id: int, image: int, size: int = SIZE) -> np.ndarray:
    """An RGB image (size, size, 3) of class ``class_id``: red 10 · the class id (so an episode's classes can be read
    back from its pixels, even through JPEG), green a colour of the class, blue varying smoothly by image."""
    array = np.empty((size, size, 3), np.uint8)
    array[:, :, 0] = 10 * class_id
    array[:, :, 1] = 37 * class_id % 256
    array[:, :, 2] = (5 * image + 3 * np.arange(size))[None, :]  # < 256 for the ≤ 10 images a class has here
    return array


def classes_in(images: torch.Tensor) -> torch.Tensor:
    """The class id of each image (n, 3, H, W) from its red channel, uint8 or float in [0, 1]."""
    red = images[:, 0].double().mean((1, 2)) * (255 if images.is_floating_point() else 1)
    return (red / 10).round().long()


def encode(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def write_classes(folder: Path, sizes: list[int], image_format: str = "PNG") -> None:
    """``{class_id}.tfrecords`` per class, as Meta-Dataset's ``write_example`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for class_id, count in enumerate(sizes):
        write_records(folder / f"{class_id}.tfrecords",
                      [encode_example({"image": encode(pixels(class_id, i), image_format), "label": class_id})
                       for i in range(count)])


def write_spec(folder: Path, spec: dict) -> None:
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=2))


def flat_source(root: Path, name: str = "aircraft", per_split: tuple[int, int, int] = (6, 5, 5),
                image_format: str = "PNG") -> list[int]:
    """A DatasetSpecification source; returns the images per class (6 + c % 4)."""
    sizes = [6 + c % 4 for c in range(sum(per_split))]
    write_classes(root / name, sizes, image_format)
    write_spec(root / name, {
        "name": name, "classes_per_split": dict(zip(("TRAIN", "VALID", "TEST"), per_split, strict=True)),
        "images_per_class": {str(c): n for c, n in enumerate(sizes)},
        "class_names": {str(c): f"model {c}" for c in range(len(sizes))},
        "path": f"/path/to/records/{name}", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"})
    return sizes


ALPHABETS = {"TRAIN": [("Greek", 6), ("Latin", 5)], "VALID": [("Tagalog", 5)], "TEST": [("Korean", 7)]}


def bilevel_source(root: Path) -> None:
    """A BiLevelDatasetSpecification as Omniglot's: alphabets (superclasses) by split, characters within."""
    superclasses = [alphabet for split in ALPHABETS.values() for alphabet in split]
    names = [f"{alphabet}-character{i + 1:02d}" for alphabet, count in superclasses for i in range(count)]
    write_classes(root / "omniglot", [4] * len(names), "JPEG")
    write_spec(root / "omniglot", {
        "name": "omniglot", "superclasses_per_split": {split: len(a) for split, a in ALPHABETS.items()},
        "classes_per_superclass": {str(s): count for s, (_, count) in enumerate(superclasses)},
        "images_per_class": {str(c): 4 for c in range(len(names))},
        "superclass_names": {str(s): alphabet for s, (alphabet, _) in enumerate(superclasses)},
        "class_names": {str(c): name for c, name in enumerate(names)},
        "path": "/path/to/records/omniglot", "file_pattern": "{}.tfrecords",
        "__class__": "BiLevelDatasetSpecification"})


def family(root: Path, tmp_path: Path, source: str = "aircraft", **settings) -> MetaDatasetSource:
    return MetaDatasetSource(**({"root": str(root), "source": source, "image_size": SIZE,
                                 "cache_dir": str(tmp_path / "cache")} | settings))


# --- the format --------------------------------------------------------------------------------------------------


def test_crc32c_matches_published_check_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value for CRC-32C
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # 32 bytes of 0xFF
    assert crc32c(bytes(range(32))) == 0x46DD794E  # 32 incrementing bytes
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C  # 32 decrementing bytes


def test_vectorised_crc32c_equals_the_byte_loop_and_continues() -> None:
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    for length in (2047, 2048, 2049, 4096 + 15, 100_003):  # below and above the vectorised path, odd tails
        assert crc32c(data[:length]) == records_module_byte_loop(data[:length]), length
    assert crc32c(data[5000:], crc32c(data[:5000])) == crc32c(data)


def records_module_byte_loop(data: bytes) -> int:
    from metalab.tasks.tfrecords import _register

    return _register(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def test_masked_crc_and_record_framing() -> None:
    crc = 0xE3069283
    # rotated right by 15: 0x1C60D | 0x25060000 = 0x2507C60D, plus 0xA282EAD8
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF == 0xC78AB0E5
    record = frame(b"abc")
    assert record[:8] == struct.pack("<Q", 3)
    assert record[8:12] == struct.pack("<I", masked_crc32c(struct.pack("<Q", 3)))
    assert record[12:15] == b"abc" and record[15:] == struct.pack("<I", masked_crc32c(b"abc"))


def test_example_encoding_is_the_protobuf_wire_format() -> None:
    encoded = encode_example({"label": 7, "image": b"xyz"})
    by_hand = bytes([
        0x0A, 34,  # Example.features (field 1, length-delimited), 34 bytes
        0x0A, 16,  # Features.feature map entry (field 1), 16 bytes
        0x0A, 5, *b"image",  # entry key (field 1)
        0x12, 7,  # entry value: a Feature (field 2), 7 bytes
        0x0A, 5,  # Feature.bytes_list (field 1)
        0x0A, 3, *b"xyz",  # BytesList.value (field 1)
        0x0A, 14,  # the next entry, 14 bytes (entries sorted by key)
        0x0A, 5, *b"label",
        0x12, 5,
        0x1A, 3,  # Feature.int64_list (field 3)
        0x0A, 1, 7,  # Int64List.value, packed (field 1): one varint, 7
    ])
    assert encoded == by_hand
    assert decode_example(by_hand) == {"image": [b"xyz"], "label": [7]}
    assert decode_example(encode_example({"x": [0.5, 2.0], "n": [-1, 2**40]})) == {"x": [0.5, 2.0], "n": [-1, 2**40]}


def test_a_record_file_reads_back_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "0.tfrecords"
    payloads = [b"", b"a", bytes(range(256)) * 20]
    write_records(path, payloads)
    assert list(read_records(path)) == payloads
    offsets, lengths, crcs = record_spans(path)
    assert lengths.tolist() == [0, 1, 5120] and offsets.tolist() == [12, 12 + 0 + 16, 12 + 0 + 16 + 1 + 16]
    assert crcs.tolist() == [masked_crc32c(p) for p in payloads]


def test_resizing_is_meta_datasets_bilinear_with_aligned_corners() -> None:
    grey = np.array([[0, 100], [200, 50]], np.uint8)  # 2×2 → 3×3: corners kept, midpoints averaged
    resized = decode_image(encode(grey, "PNG"), 3, "L")[0]
    assert resized.tolist() == [[0, 50, 100], [100, 88, 75], [200, 125, 50]]  # centre: (0+100+200+50)/4 = 87.5 → 88


# --- the spec and the splits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_images_labels_and_splits_follow_the_spec(tmp_path: Path, image_format: str) -> None:
    sizes = flat_source(tmp_path / "records", image_format=image_format)
    source = family(tmp_path / "records", tmp_path)
    first = {"train": 0, "val": 6, "test": 11}  # classes_per_split 6/5/5: ids 0-5, 6-10, 11-15
    for split, count in zip(SPLITS, (6, 5, 5), strict=True):
        data = source.load_split(split)
        ids = range(first[split], first[split] + count)
        assert data.class_names == [f"model {c}" for c in ids]
        assert data.samples_per_class().tolist() == [sizes[c] for c in ids]
        expected = np.stack([pixels(c, i).transpose(2, 0, 1) for c in ids for i in range(sizes[c])])
        if image_format == "PNG":  # lossless: exactly the pixels written
            assert np.array_equal(data.images.numpy(), expected)
        else:  # JPEG: what PIL decodes from the same bytes, close to what was written
            again = np.stack([np.asarray(Image.open(io.BytesIO(encode(pixels(c, i), "JPEG"))).convert("RGB"))
                              .transpose(2, 0, 1) for c in ids for i in range(sizes[c])])
            assert np.array_equal(data.images.numpy(), again)
            assert np.abs(data.images.numpy().astype(int) - expected).mean() < 3  # close to what was written
        assert torch.equal(data.labels, torch.repeat_interleave(torch.arange(count), torch.tensor(
            [sizes[c] for c in ids])))


def test_a_bilevel_spec_names_classes_by_superclass(tmp_path: Path) -> None:
    bilevel_source(tmp_path)
    source = family(tmp_path, tmp_path, "omniglot")
    train = source.load_split("train")
    assert source.name == "omniglot" and len(train.class_names) == 11
    assert train.class_names[0] == "Greek/Greek-character01" and train.class_names[6] == "Latin/Latin-character01"
    assert train.superclasses() == ["Greek"] * 6 + ["Latin"] * 5
    assert source.load_split("val").superclasses() == ["Tagalog"] * 5
    test = source.load_split("test")
    assert test.superclasses() == ["Korean"] * 7
    assert torch.equal(classes_in(test.images)[::4], torch.arange(16, 23))  # ids 16-22


def test_a_hierarchical_spec_takes_each_splits_leaves(tmp_path: Path) -> None:
    """ILSVRC-2012's form: a split's classes are its subgraph's leaves, ids given by class_names (WordNet ids)."""
    folder = tmp_path / "ilsvrc_2012"
    write_classes(folder, [5] * 15)
    leaves = {"TRAIN": [f"n0{c}" for c in range(5)], "VALID": [f"n1{c}" for c in range(5)],
              "TEST": [f"n2{c}" for c in range(5)]}

    def graph(split: str) -> list[dict]:
        root = {"wn_id": f"root-{split}", "words": "entity", "children_ids": leaves[split], "parents_ids": []}
        return [root, *({"wn_id": w, "words": w, "children_ids": [], "parents_ids": [root["wn_id"]]}
                        for w in leaves[split])]

    write_spec(folder, {
        "name": "ilsvrc_2012", "split_subgraphs": {split: graph(split) for split in leaves},
        "images_per_class": {split: {**{w: 5 for w in leaves[split]}, f"root-{split}": 25} for split in leaves},
        "class_names": {str(c): w for c, w in enumerate(w for split in leaves.values() for w in split)},
        "path": "/path", "file_pattern": "{}.tfrecords", "__class__": "HierarchicalDatasetSpecification"})
    source = family(tmp_path, tmp_path, "ilsvrc_2012")
    assert source.load_split("val").class_names == leaves["VALID"]
    assert source.load_split("test").superclasses() is None  # no alphabets: the hierarchy instead
    assert source.load_split("test").hierarchy == [[0, 1, 2, 3, 4]]  # the root spans every leaf of its split
    assert torch.equal(classes_in(source.load_split("test").images)[::5], torch.arange(10, 15))


def test_a_hierarchy_spans_each_internal_node_s_leaves_in_wordnet_order() -> None:
    """root → {animal → {dog, cat}, plant → {fern}}, and tree reached twice (under plant and root: a DAG)."""
    graph = [{"wn_id": "n0root", "children_ids": ["n1animal", "n2plant", "n9tree"]},
             {"wn_id": "n1animal", "children_ids": ["n5dog", "n3cat"]},
             {"wn_id": "n2plant", "children_ids": ["n4fern", "n9tree"]},
             *({"wn_id": leaf, "children_ids": []} for leaf in ("n3cat", "n4fern", "n5dog", "n9tree"))]
    assert records_module.spanned_leaves(graph) == {"n0root": {"n3cat", "n4fern", "n5dog", "n9tree"},
                                                    "n1animal": {"n3cat", "n5dog"}, "n2plant": {"n4fern", "n9tree"}}


def test_a_source_held_out_of_a_split_says_so(tmp_path: Path) -> None:
    flat_source(tmp_path, "traffic_sign", per_split=(0, 0, 5))  # Meta-Dataset's test-only sources
    with pytest.raises(ConfigError, match=r"^dataset_spec.json of traffic_sign gives its train split no classes "
                                          r"\(TRAIN 0, VALID 0, TEST 5\)"):
        family(tmp_path, tmp_path, "traffic_sign").prepare()


# --- missing and corrupt data -----------------------------------------------------------------------------------


def test_a_missing_source_is_one_line_naming_source_layout_and_root(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError) as error:
        family(tmp_path / "nowhere", tmp_path, "fungi").prepare()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"Meta-Dataset source 'fungi' not found: no {tmp_path}/nowhere/fungi/dataset_spec.json; "
                              "expected <root>/<source>/dataset_spec.json and one <class_id>.tfrecords per class")
    assert f"task.root={tmp_path}/nowhere" in message


def test_a_missing_class_file_is_named(tmp_path: Path) -> None:
    flat_source(tmp_path)
    (tmp_path / "aircraft" / "7.tfrecords").unlink()
    with pytest.raises(DataMissingError, match=r"7.tfrecords not found: .*dataset_spec.json lists class 7 \(model 7\)"):
        family(tmp_path, tmp_path).prepare()


@pytest.mark.parametrize(("change", "message"), [
    ({"file_pattern": "{}_{}.tfrecords"}, r"file_pattern '\{\}_\{\}.tfrecords' is not read \(shards or example-level "
                                          r"pools\); metalab reads one '\{\}.tfrecords' file per class$"),
    ({"classes_per_split": {"TRAIN": 6, "VALID": 5, "TEST": 6}}, r"class 16 of its splits is missing from class_names"),
    ({"classes_per_split": {"TRAIN": 6, "VALID": 5}}, r"is not a Meta-Dataset dataset_spec.json \(KeyError: 'TEST'\)"),
    ({"__class__": "DatasetSpec"}, r"__class__ 'DatasetSpec' is none of DatasetSpecification, "),
], ids=["shards", "too-many-classes", "no-test-count", "unknown-class"])
def test_a_malformed_spec_is_one_line_naming_it(tmp_path: Path, change: dict, message: str) -> None:
    flat_source(tmp_path)
    spec = json.loads((tmp_path / "aircraft" / "dataset_spec.json").read_text())
    write_spec(tmp_path / "aircraft", spec | change)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/aircraft/dataset_spec.json(: | ){message}"):
        family(tmp_path, tmp_path, sampler="meta_dataset").prepare()


def flip_byte_of_record(path: Path, record: int, at: int) -> None:
    offsets, _, _ = record_spans(path)
    content = bytearray(path.read_bytes())
    content[offsets[record] + at] ^= 0x40
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("max_in_memory", [100_000, 0], ids=["decoded-whole", "lazy"])
def test_a_flipped_byte_is_caught_by_the_crc_naming_file_and_record(tmp_path: Path, max_in_memory: int) -> None:
    flat_source(tmp_path)
    path = tmp_path / "aircraft" / "2.tfrecords"
    flip_byte_of_record(path, 3, at=40)  # inside the image bytes
    source = family(tmp_path, tmp_path, max_in_memory=max_in_memory)
    with pytest.raises(ConfigError, match=rf"^{path}: record 3 is corrupt \(the CRC of its data does not match\)"):
        source.load_split("train").images[torch.arange(14, 22)]  # class 2's images: 6 + 7 before it


def test_a_damaged_length_or_a_truncated_file_is_refused_at_indexing(tmp_path: Path) -> None:
    flat_source(tmp_path)
    damaged, truncated = tmp_path / "aircraft" / "4.tfrecords", tmp_path / "aircraft" / "5.tfrecords"
    content = bytearray(damaged.read_bytes())
    offsets = record_spans(damaged)[0]
    content[offsets[1] - 12] ^= 0x01  # record 1's length
    damaged.write_bytes(bytes(content))
    with pytest.raises(ConfigError, match=rf"^{damaged}: record 1 is corrupt \(the CRC of its length does not match\)"):
        family(tmp_path, tmp_path).prepare()
    damaged.unlink()
    flat_source(tmp_path)  # whole again
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=rf"^{truncated}: record 6 is corrupt \(truncated: it needs bytes up to"):
        family(tmp_path, tmp_path).prepare()


def test_a_file_holding_fewer_records_than_the_spec_is_refused(tmp_path: Path) -> None:
    flat_source(tmp_path)
    path = tmp_path / "aircraft" / "0.tfrecords"
    offsets = record_spans(path)[0]
    path.write_bytes(path.read_bytes()[:offsets[5] - 12])  # cut at a record boundary: no CRC can tell
    with pytest.raises(ConfigError, match=r"0.tfrecords holds 5 records but dataset_spec.json gives class 0 6 images"):
        family(tmp_path, tmp_path).prepare()


# --- lazy reading, the cache, the description -------------------------------------------------------------------


def test_lazy_and_in_memory_serve_the_same_episodes(tmp_path: Path) -> None:
    flat_source(tmp_path)
    whole = family(tmp_path, tmp_path, sampler="meta_dataset")
    lazy = family(tmp_path, tmp_path, sampler="meta_dataset", max_in_memory=0)
    whole.prepare()
    lazy.prepare()
    assert not whole.lazy and isinstance(whole.load_split("train").images, torch.Tensor)
    assert lazy.lazy and isinstance(lazy.load_split("train").images, RecordImages)
    for split in SPLITS:
        a = whole.sample(3, torch.Generator().manual_seed(4), split)
        b = lazy.sample(3, torch.Generator().manual_seed(4), split)
        for task_a, task_b in zip(a, b, strict=True):
            assert torch.equal(task_a.support_x, task_b.support_x) and torch.equal(task_a.query_y, task_b.query_y)


def test_an_episode_is_drawn_with_the_meta_dataset_sampler(tmp_path: Path) -> None:
    bilevel_source(tmp_path)
    source = family(tmp_path, tmp_path, "omniglot", sampler="meta_dataset", max_in_memory=0)
    source.prepare()
    for task in source.sample(4, torch.Generator().manual_seed(0), "train"):
        classes = classes_in(task.support_x)
        assert set(classes.tolist()) <= set(range(6)) or set(classes.tolist()) <= set(range(6, 11))  # one alphabet
        ways = int(task.support_y.max()) + 1
        assert 5 <= ways <= 6 and task.support_x.shape[1:] == (3, SIZE, SIZE)
        assert torch.equal(torch.bincount(task.query_y), torch.full((ways,), 2))  # min(10, ⌊4 / 2⌋)


def test_fixed_episodes_from_a_lazy_store(tmp_path: Path) -> None:
    flat_source(tmp_path)
    source = family(tmp_path, tmp_path, ways=5, shots=2, queries=3, max_in_memory=0, channels=1)
    tasks = source.sample(2, torch.Generator().manual_seed(0), "test")
    assert tasks.support_x.shape == (2, 10, 1, SIZE, SIZE) and tasks.query_x.shape == (2, 15, 1, SIZE, SIZE)


def test_the_index_and_decoded_images_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flat_source(tmp_path)
    first = family(tmp_path, tmp_path, sampler="meta_dataset")
    first.prepare()
    assert len(list((tmp_path / "cache").glob("meta-dataset-aircraft-index-*.npz"))) == 1
    assert len(list((tmp_path / "cache").glob("meta-dataset-aircraft-*-*.npy"))) == 3  # a decoded file per split

    def refuse(*args: object) -> None:
        raise AssertionError("read again, not from the cache")

    monkeypatch.setattr(records_module, "record_spans", refuse)
    monkeypatch.setattr(records_module, "decode_image", refuse)
    again = family(tmp_path, tmp_path, sampler="meta_dataset")
    again.prepare()
    assert torch.equal(again.load_split("val").images, first.load_split("val").images)
    monkeypatch.undo()
    (tmp_path / "aircraft" / "3.tfrecords").touch()  # a changed file: indexed again
    with pytest.raises(AssertionError, match="read again"):
        monkeypatch.setattr(records_module, "record_spans", refuse)
        family(tmp_path, tmp_path, sampler="meta_dataset").prepare()


def test_the_digest_follows_the_records_not_where_they_are(tmp_path: Path) -> None:
    flat_source(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    spec = json.loads((tmp_path / "b" / "aircraft" / "dataset_spec.json").read_text())
    write_spec(tmp_path / "b" / "aircraft", spec | {"path": "/elsewhere/aircraft"})  # the path is machine-specific
    here, there = family(tmp_path / "a", tmp_path), family(tmp_path / "b", tmp_path)
    described = here.data_description()
    assert described["digest"] == there.data_description()["digest"]
    # 6 + c % 4 images in class c = 0..5
    assert (described["train_classes"], described["train_images"], described["lazy"]) == ("6", "43", "false")
    flip_byte_of_record(tmp_path / "b" / "aircraft" / "1.tfrecords", 0, at=30)
    write_records(tmp_path / "b" / "aircraft" / "9.tfrecords",  # re-written whole: valid CRCs, other image
                  [encode_example({"image": encode(pixels(9, i + 1), "PNG"), "label": 9}) for i in range(7)])
    assert family(tmp_path / "b", tmp_path, cache_dir=str(tmp_path / "other")).digest() != described["digest"]
    assert family(tmp_path / "a", tmp_path, image_size=SIZE + 1).digest() != described["digest"]


def test_metalab_train_learns_from_records(tmp_path: Path) -> None:
    """Protonet end to end on Omniglot-like records: the classes differ in colour, so a prototype classifier tells
    them apart from the first step; chance is at most 1/5 (5-7 ways). Labels misaligned anywhere between record,
    split and episode would bring it down to chance."""
    bilevel_source(tmp_path / "records")
    result = run_cli(["task=meta_dataset_source", f"task.root={tmp_path / 'records'}", "task.source=omniglot",
                      f"task.cache_dir={tmp_path / 'cache'}", "task.image_size=28", "algorithm=protonet",
                      "model.hidden_size=16", "tracking=none", "trainer.max_steps=3", "task.meta_batch_size=2",
                      # batches of 2 ragged tasks: the predictions of some share one shape (stacked by the runner)
                      "task.val_tasks=2", "task.test_tasks=4", "task.eval_batch_size=2",
                      "trainer.enable_progress_bar=false", "runner.backend=loop"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = re.search(r"post-adaptation accuracy: ([0-9.]+)", result.stdout + result.stderr)
    assert accuracy and float(accuracy.group(1)) > 0.8, result.stdout[-2000:]
    assert list((tmp_path / "cache").glob("meta-dataset-omniglot-index-*.npz"))  # read from the records
