"""TFRecord files of ``tf.train.Example`` records, read and written without TensorFlow.

A TFRecord file is a sequence of records, each framed as::

    uint64 length | uint32 masked_crc32c(length bytes) | data (length bytes) | uint32 masked_crc32c(data)

little-endian, where ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2³²) and CRC-32C is the
Castagnoli polynomial (reflected 0x82F63B78, initial and final XOR 0xFFFFFFFF). The length's CRC is checked
whenever a header is read; the data's whenever a record's data is read (:func:`read_record`, :func:`read_records`),
by a numpy CRC-32C (:func:`crc32c`) that runs at roughly 50–100 MB/s here, a small cost beside decoding the
image the record holds (see ``benchmarks/meta_dataset_records.py``).

Records are ``tf.train.Example`` protocol buffers (TensorFlow's ``example.proto`` and ``feature.proto``), whose
message classes are built here from a descriptor written in code, so the installed ``protobuf`` package parses
and serialises them; no generated ``_pb2`` module, no TensorFlow. Meta-Dataset (Triantafillou et al., ICLR 2020;
``meta_dataset/dataset_conversion/dataset_to_records.py``) writes one such file per class, each record holding
``image`` (bytes: an encoded JPEG or PNG) and ``label`` (int64: the class id).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from metalab.errors import ConfigError

HEADER = struct.Struct("<QI")  # length, masked CRC-32C of the 8 length bytes
FOOTER = struct.Struct("<I")  # masked CRC-32C of the data
_MASK_DELTA = 0xA282EAD8
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reflected


# --- CRC-32C -----------------------------------------------------------------------------------------------


def _byte_tables() -> np.ndarray:
    """Slicing-by-4 tables (4, 256): ``[0]`` the usual byte table, ``[k]`` a byte followed by k zero bytes."""
    tables = np.zeros((4, 256), np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        tables[0, byte] = crc
    for k in range(1, 4):
        tables[k] = (tables[k - 1] >> 8) ^ tables[0][tables[k - 1] & 0xFF]
    return tables


_TABLES = _byte_tables()
_TABLE = [int(value) for value in _TABLES[0]]  # plain ints: the byte loop's lookups stay in Python
_UNIT = np.uint32(1) << np.arange(32, dtype=np.uint32)  # e_0 … e_31
_BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # (256, 8): the bits of each byte
_LANE = 16  # bytes per lane of the vectorised CRC
_VECTOR_FROM = 1024  # shorter data: the byte loop is as fast (measured: the two cross at 1–2 KiB)


def _linear_tables(columns: np.ndarray) -> np.ndarray:
    """A GF(2)-linear map of 32-bit words, given by its images of e_0 … e_31, as 4 byte tables (4, 256)."""
    return np.stack([np.bitwise_xor.reduce(np.where(_BYTE_BITS, columns[8 * k:8 * k + 8], np.uint32(0)), axis=1)
                     for k in range(4)])


def _apply(tables: np.ndarray, words: np.ndarray) -> np.ndarray:
    return (tables[0][words & 0xFF] ^ tables[1][(words >> 8) & 0xFF] ^ tables[2][(words >> 16) & 0xFF]
            ^ tables[3][words >> 24])


# _ZEROS[j]: the CRC register's map over 2^j zero bytes (linear: appending zeros shifts a CRC by this map)
_ZEROS = [_linear_tables(_TABLES[0][_UNIT & 0xFF] ^ (_UNIT >> 8))]


def _zeros(j: int) -> np.ndarray:
    while len(_ZEROS) <= j:
        last = _ZEROS[-1]
        _ZEROS.append(_linear_tables(_apply(last, _apply(last, _UNIT))))  # 2^j zeros twice
    return _ZEROS[j]


def _register(state: int, data: bytes | memoryview) -> int:
    """The CRC register after ``data``, one byte at a time (no initial or final XOR)."""
    table = _TABLE
    for byte in data:
        state = table[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data`` (``crc``: the CRC of what came before, to continue it); ``crc32c(b"123456789")`` is
    0xE3069283.

    Data of 1 KiB and more is split into lanes of 16 bytes whose registers advance together in numpy
    (slicing-by-4), then combined pairwise: the register is linear over GF(2), so the CRC of ``a + b`` is the
    register of ``a`` carried over ``len(b)`` zero bytes, XOR that of ``b`` from zero.
    """
    state = crc ^ 0xFFFFFFFF
    lanes = len(data) // _LANE
    if len(data) >= _VECTOR_FROM:
        levels = (lanes - 1).bit_length()
        # zero lanes in front change nothing: a zero register carried over zeros stays zero
        registers = np.zeros(1 << levels, np.uint32)
        words = np.frombuffer(data, "<u4", count=lanes * _LANE // 4).reshape(lanes, _LANE // 4)
        own = registers[-lanes:]
        own[0] = state
        first, second, third, fourth = _TABLES
        for column in range(_LANE // 4):
            own ^= words[:, column]
            own = fourth[own & 0xFF] ^ third[(own >> 8) & 0xFF] ^ second[(own >> 16) & 0xFF] ^ first[own >> 24]
        registers[-lanes:] = own
        for level in range(levels):  # pairs: the left register carried over the right one's bytes, XOR the right
            registers = _apply(_zeros(4 + level), registers[0::2]) ^ registers[1::2]  # 16 · 2^level = 2^(4+level)
        state = int(registers[0])
        data = memoryview(data)[lanes * _LANE:]
    return _register(state, data) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord's stored form of a CRC-32C (rotated right 15 bits, plus a constant)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --- tf.train.Example ----------------------------------------------------------------------------------------


def _example_file() -> descriptor_pb2.FileDescriptorProto:
    """TensorFlow's ``feature.proto`` and ``example.proto`` (proto3, package ``tensorflow``) as a descriptor."""
    proto = descriptor_pb2.FileDescriptorProto(name="metalab/tf_example.proto", package="tensorflow", syntax="proto3")
    field = descriptor_pb2.FieldDescriptorProto
    repeated, optional = field.LABEL_REPEATED, field.LABEL_OPTIONAL

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> descriptor_pb2.DescriptorProto:
        described = proto.message_type.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            added = described.field.add(name=field_name, number=number, label=label, type=kind, json_name=field_name)
            if type_name:  # set only for message fields: an empty one still counts as set
                added.type_name = type_name
        return described

    message("BytesList", ("value", 1, repeated, field.TYPE_BYTES, ""))
    message("FloatList", ("value", 1, repeated, field.TYPE_FLOAT, ""))  # packed: proto3's default
    message("Int64List", ("value", 1, repeated, field.TYPE_INT64, ""))
    feature = message("Feature", ("bytes_list", 1, optional, field.TYPE_MESSAGE, ".tensorflow.BytesList"),
                      ("float_list", 2, optional, field.TYPE_MESSAGE, ".tensorflow.FloatList"),
                      ("int64_list", 3, optional, field.TYPE_MESSAGE, ".tensorflow.Int64List"))
    feature.oneof_decl.add(name="kind")
    for member in feature.field:
        member.oneof_index = 0
    features = message("Features", ("feature", 1, repeated, field.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")  # map<string, Feature>: a repeated map-entry message
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=optional, type=field.TYPE_STRING, json_name="key")
    entry.field.add(name="value", number=2, label=optional, type=field.TYPE_MESSAGE, type_name=".tensorflow.Feature",
                    json_name="value")
    message("Example", ("features", 1, optional, field.TYPE_MESSAGE, ".tensorflow.Features"))
    return proto


_POOL = descriptor_pool.DescriptorPool()  # a private pool: no clash with TensorFlow's own, if it is imported
_POOL.Add(_example_file())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))
Feature = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Feature"))

FeatureValue = bytes | int | float | list[bytes] | list[int] | list[float]


def encode_example(features: dict[str, FeatureValue]) -> bytes:
    """A serialised ``tf.train.Example``: bytes → ``bytes_list``, int → ``int64_list``, float → ``float_list``
    (a list gives several values). Map entries are written sorted by key (deterministic serialisation)."""
    example = Example()
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[key]
        if all(isinstance(item, bytes) for item in values):
            feature.bytes_list.value.extend(values)
        elif all(isinstance(item, int) for item in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(item, float) for item in values):
            feature.float_list.value.extend(values)
        else:
            raise TypeError(f"feature {key!r}: expected bytes, int or float values, got {value!r}")
    return example.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> dict[str, list[bytes] | list[int] | list[float]]:
    """A serialised ``tf.train.Example`` as ``{key: values}`` (``DecodeError`` on bytes that are not one)."""
    example = Example.FromString(data)
    decoded = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        decoded[key] = list(getattr(feature, kind).value) if kind else []
    return decoded


# --- framing ------------------------------------------------------------------------------------------------


def _corrupt(path: Path | str, index: int, why: str) -> ConfigError:
    return ConfigError(f"{path}: record {index} is corrupt ({why}): convert the data again, or restore the file")


def _check_header(path: Path | str, index: int, header: bytes) -> int:
    length, stored = HEADER.unpack(header)
    if masked_crc32c(header[:8]) != stored:
        raise _corrupt(path, index, "the CRC of its length does not match")
    return length


def record_spans(path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each record's data lies, reading only the framing: ``(offsets, lengths, masked data CRCs)``, int64,
    int64 and uint32 arrays. Each length's CRC is checked; a file that ends inside a record is refused."""
    offsets, lengths, crcs = [], [], []
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as handle:
        position, header = 0, handle.read(HEADER.size)
        while header:
            index = len(offsets)
            if len(header) < HEADER.size:
                raise _corrupt(path, index, f"truncated: the file ends inside its header, at byte {size}")
            length = _check_header(path, index, header)
            end = position + HEADER.size + length + FOOTER.size
            if end > size:
                raise _corrupt(path, index, f"truncated: it needs bytes up to {end}, the file ends at {size}")
            handle.seek(length, os.SEEK_CUR)
            tail = handle.read(FOOTER.size + HEADER.size)  # this record's data CRC, then the next header
            offsets.append(position + HEADER.size)
            lengths.append(length)
            crcs.append(FOOTER.unpack_from(tail)[0])
            position, header = end, tail[FOOTER.size:]
    return np.array(offsets, np.int64), np.array(lengths, np.int64), np.array(crcs, np.uint32)


def read_record(descriptor: int, offset: int, length: int, path: Path | str, index: int) -> bytes:
    """Record ``index``'s data (``offset``, ``length`` from :func:`record_spans`) read from an open file
    descriptor; its CRC is checked."""
    chunk = os.pread(descriptor, length + FOOTER.size, offset)
    if len(chunk) < length + FOOTER.size:
        raise _corrupt(path, index, f"truncated: the file ends before byte {offset + length + FOOTER.size}")
    data = chunk[:length]
    if masked_crc32c(data) != FOOTER.unpack_from(chunk, length)[0]:
        raise _corrupt(path, index, "the CRC of its data does not match")
    return data


def read_records(path: Path | str) -> Iterator[bytes]:
    """Every record's data, in order, each CRC checked."""
    with open(path, "rb") as handle:
        index = 0
        while header := handle.read(HEADER.size):
            if len(header) < HEADER.size:
                raise _corrupt(path, index, "truncated: the file ends inside its header")
            length = _check_header(path, index, header)
            chunk = handle.read(length + FOOTER.size)
            if len(chunk) < length + FOOTER.size:
                raise _corrupt(path, index, "truncated: the file ends inside it")
            data = chunk[:length]
            if masked_crc32c(data) != FOOTER.unpack_from(chunk, length)[0]:
                raise _corrupt(path, index, "the CRC of its data does not match")
            yield data
            index += 1


def frame(data: bytes) -> bytes:
    """One record as a TFRecord file holds it."""
    length = struct.pack("<Q", len(data))
    return length + FOOTER.pack(masked_crc32c(length)) + data + FOOTER.pack(masked_crc32c(data))


def write_records(path: Path | str, records: Iterable[bytes]) -> None:
    """Write a TFRecord file, as TensorFlow's ``TFRecordWriter`` does (uncompressed). It exists for tests and
    tools that make data in Meta-Dataset's format; metalab itself only reads."""
    with open(path, "wb") as handle:
        for data in records:
            handle.write(frame(data))
