"""Reading DCP checkpoints without trusting them: no unpickling of arbitrary objects, no byte entries,
no file outside the checkpoint directory.

DCP's ``.metadata`` is a pickle, and its default reader would (1) unpickle it with every class
reachable, (2) unpickle any *byte* entry it declares with ``torch.load(weights_only=False)``, and
(3) open whatever ``relative_path`` an entry names, ``../`` included. `SafeFileSystemReader` closes
all three: the metadata goes through an allow-list unpickler that admits only the classes of
tensor entries, every entry must be a tensor entry stored in a plain file of the checkpoint
directory, and a byte read is refused even if a planner asks for one. Tensors themselves are read
by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType

from olmo_fn.errors import CheckpointError
from olmo_fn.io.paths import contained_path

# What the ``.metadata`` of a checkpoint of tensors refers to (besides torch dtypes). DCP's byte
# entries (BytesStorageMetadata) are deliberately absent: olmo_fn never writes them, and reading one
# unpickles arbitrary data.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what the ``.metadata`` of a checkpoint of tensors legitimately holds."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def read_safe_metadata(directory: Path) -> Metadata:
    """The validated DCP metadata of the checkpoint in `directory` (see the module docstring)."""
    path = directory / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    except Exception as exc:  # unpickling raises many types on malformed input
        raise CheckpointError(f"{path}: cannot read the DCP metadata: {exc}") from None
    validate_metadata(metadata, directory)
    return metadata


def validate_metadata(metadata: Any, directory: Path) -> None:
    """Refuse metadata that is not a tensors-only checkpoint stored inside `directory`."""
    where = directory / ".metadata"
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{where}: not DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or type(entry) is not TensorStorageMetadata:
            raise CheckpointError(
                f"{where}: entry {key!r} is a {type(entry).__name__}, not a tensor; olmo_fn checkpoints "
                "hold tensors only, and reading anything else would unpickle it"
            )
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{where}: storage_data is a {type(storage).__name__}, not a mapping")
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise CheckpointError(f"{where}: storage entry {index!r} is not a DCP file location")
        if info.transform_descriptors:
            raise CheckpointError(
                f"{where}: {index.fqn} is stored through transforms {list(info.transform_descriptors)}; "
                "olmo_fn writes plain tensors only"
            )
        if not all(type(n) is int and n >= 0 for n in (info.offset, info.length)):
            raise CheckpointError(f"{where}: {index.fqn} has an invalid byte range")
        contained_path(directory, info.relative_path, f"{where}: {index.fqn}", follow_links=True)


def storage_files(metadata: Metadata) -> set[str]:
    """The file names (relative to the checkpoint) that hold the tensors of validated `metadata`."""
    return {info.relative_path for info in metadata.storage_data.values()}


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, reading only validated metadata and tensor entries (module docstring)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._directory = Path(path)

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never falls back to per-rank files
        metadata = read_safe_metadata(self._directory)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(
                    f"{self._directory}: refusing to read {item.storage_index.fqn} as pickled bytes"
                )
            info = self.storage_data[item.storage_index]
            contained_path(self._directory, info.relative_path, str(self._directory), follow_links=True)
        return super().read_data(plan, planner)
