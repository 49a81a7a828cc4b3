"""Ways an attacker (or an accident) can alter a checkpoint, for the tests that prove loading resists them.

Each function edits a copy of a real checkpoint and then rewrites its manifest's checksums, as an
attacker who controls the directory would, so that what stops the attack is the check under test and
not the checksum.
"""

from __future__ import annotations

import pathlib
import pickle
import sys
from pathlib import Path

import orjson
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from olmo_fn.state.checksums import file_digests


class TouchOnUnpickle:
    """Unpickling this creates `marker`: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def reseal(checkpoint: Path) -> None:
    """Recompute the manifest's per-file checksums after an edit."""
    manifest_path = checkpoint / "manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["files"] = file_digests(checkpoint, skip=("manifest.json",))
    manifest_path.write_bytes(orjson.dumps(manifest))


def _metadata(checkpoint: Path):
    return pickle.loads((checkpoint / ".metadata").read_bytes())  # our own file: trusted here


def _write_metadata(checkpoint: Path, metadata) -> None:
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(checkpoint)


def plant_byte_entry(checkpoint: Path, key: str, marker: Path) -> None:
    """Declare tensor `key` a DCP byte entry stored in a pickle that creates `marker` when loaded.

    The entry carries the tensor's real ``torch.Size`` as ``size``, so a check that only compares
    shapes lets it through; DCP's stock reader would ``torch.load(weights_only=False)`` it.
    """
    metadata = _metadata(checkpoint)
    entry = BytesStorageMetadata()
    entry.size = metadata.state_dict_metadata[key].size
    metadata.state_dict_metadata[key] = entry
    metadata.storage_data = {i: v for i, v in metadata.storage_data.items() if i.fqn != key}
    payload = pickle.dumps(TouchOnUnpickle(marker))
    (checkpoint / "payload.distcp").write_bytes(payload)
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("payload.distcp", 0, len(payload))
    _write_metadata(checkpoint, metadata)


def redirect_storage(checkpoint: Path, relative_path: str) -> None:
    """Point every tensor entry's file at `relative_path` (e.g. ``../elsewhere.distcp``)."""
    metadata = _metadata(checkpoint)
    for index, info in metadata.storage_data.items():
        metadata.storage_data[index] = _StorageInfo(relative_path, info.offset, info.length)
    _write_metadata(checkpoint, metadata)


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of `path` (same size, different content)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


class OpenedFiles:
    """Records every file Python opens (an audit hook), to prove a path was refused before opening.

    Audit hooks cannot be removed; this one records only while a `watching` block is active.
    """

    _installed: OpenedFiles | None = None

    def __init__(self):
        self.paths: list[str] = []
        self.active = False

    @classmethod
    def get(cls) -> OpenedFiles:
        if cls._installed is None:
            cls._installed = OpenedFiles()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event == "open" and args and isinstance(args[0], str | bytes | Path):
            self.paths.append(str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode())))

    def __enter__(self) -> OpenedFiles:
        self.paths = []
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def touched(self, path: Path) -> bool:
        target = str(path.resolve())
        return any(str(Path(p).resolve()) == target for p in self.paths)
