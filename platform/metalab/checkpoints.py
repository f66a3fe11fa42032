"""Checkpoint files: written atomically (:class:`AtomicCheckpointIO`), checked before a resume uses one
(:func:`read_checkpoint`, :func:`check_resumable`).

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file is made by
``tempfile.mkstemp()`` in the system's temporary folder, then moved over the target. When that folder is on
another file system than the checkpoints (a node's local ``/tmp``, checkpoints on shared storage: the usual
cluster), the move is a copy into the target itself: a job killed during the copy leaves a truncated
``last.ckpt``, and the state it replaced is gone too.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from metalab.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a hidden temporary file beside its target, syncs it to disk, then renames it over
    the target (``os.replace``, atomic on one file system): a reader sees the old file or the new one, whole.

    A save that fails (an exception, Ctrl-C) removes its temporary file; one killed outright leaves it, hidden
    (``.last.ckpt.<pid>.tmp``), and the next save to that target removes it. Remote paths (``s3://``, ...) are
    Lightning's to write. Installed by ``metalab.train.make_trainer`` (``Trainer(plugins=...)``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # from a save killed mid-write
            leftover.unlink(missing_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _sync_folder(target.parent)  # the rename itself survives a crash of the machine


def _sync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a file system that cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be read whole; the message says why."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Check every member of the checkpoint's zip archive against its CRC, then load it as Lightning will
    (``torch.load``, memory-mapped: tensors are not read into memory); raise :class:`UnreadableCheckpoint`."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise UnreadableCheckpoint(f"its member {damaged} fails its CRC check")
        return torch.load(path, map_location="cpu", mmap=True)
    except UnreadableCheckpoint:
        raise
    except zipfile.BadZipFile as error:  # the zip's directory sits at the end: a truncated file has none
        raise UnreadableCheckpoint(f"truncated or corrupt: {error}") from None
    except Exception as error:
        raise UnreadableCheckpoint(f"{type(error).__name__}: {' '.join(str(error).split())}") from None


def check_resumable(path: Path, what: str) -> dict[str, Any]:
    """The loaded checkpoint ``path``; else a ``ConfigError`` naming it, why it is unreadable and the newest
    readable checkpoint beside it with finite weights (not one saved as training diverged) to continue from
    instead (``what``: the line's prefix, e.g. ``resume=<id>``)."""
    try:
        return read_checkpoint(path)
    except UnreadableCheckpoint as reason:
        problem = f"{what}: checkpoint {path} is unreadable ({reason})"
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime)
    for other in reversed(others):
        try:
            checkpoint = read_checkpoint(other)
        except UnreadableCheckpoint:
            continue
        if all(torch.isfinite(value).all() for value in checkpoint.get("state_dict", {}).values()
               if isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise ConfigError(f"{problem}: the newest readable checkpoint beside it is {other.name} (step "
                              f"{checkpoint.get('global_step', '?')}); to continue from it, run cp '{other}' "
                              f"'{path}' and then the same command again")
    raise ConfigError(f"{problem}, and no other checkpoint in {path.parent} is readable: start a new run")
