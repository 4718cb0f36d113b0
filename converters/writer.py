"""Streaming safetensors writer (the output folder itself is made atomic by :mod:`moe_patch.atomic`).

Every output tensor's name, shape and dtype is known before any weight is computed, so each shard's
header is written first and tensors are streamed into it one at a time: memory holds one tensor, not
one shard. The bytes follow the safetensors format exactly (8-byte little-endian header length, JSON
header padded with spaces to a multiple of 8, contiguous data), and the header is written with sorted
keys, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_patch.errors import CheckpointError, OutputError
from moe_patch.io import INDEX_NAME

from .checkpoint import TORCH_TO_ST

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
__all__ = ["OutputError", "ShardWriter", "TensorSpec", "plan_shards", "shard_names"]  # OutputError: moe_patch.errors


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as the header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": TORCH_TO_ST[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Write planned shards into ``folder``; call :meth:`write` once per tensor, in plan order."""

    def __init__(self, folder: Path, shards: list[list[TensorSpec]], metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = shards
        self.names = shard_names(len(shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._pos = 0
        self._file = None
        self._file_index = -1

    def _open(self, index: int) -> None:
        self._close_file()
        self._file = open(self.folder / self.names[index], "wb")  # noqa: SIM115 - stays open across write() calls
        self._file_index = index
        self._write_bytes(_header_bytes(self.shards[index], self.metadata))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_bytes(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)

    def write(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor: a tensor, or its consecutive row blocks (dim 0) one at a time."""
        if self._pos >= len(self._queue):
            raise CheckpointError(f"internal error: tensor {name} written after the planned ones")
        index, spec = self._queue[self._pos]
        if index != self._file_index:
            self._open(index)
        blocks = [tensor] if isinstance(tensor, torch.Tensor) else tensor
        rows = 0
        for block in blocks:
            if name != spec.name or tuple(block.shape[1:]) != spec.shape[1:] or block.dtype != spec.dtype:
                raise CheckpointError(
                    f"internal error: expected {spec.name} {list(spec.shape)} {spec.dtype}, "
                    f"got {name} {list(block.shape)} {block.dtype}"
                )
            rows += block.shape[0] if block.dim() else 1
            if block.numel():
                flat = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                self._write_bytes(memoryview(flat.numpy()))
        if rows != (spec.shape[0] if spec.shape else 1):
            raise CheckpointError(f"internal error: {spec.name} got {rows} rows, planned {list(spec.shape)}")
        self._pos += 1

    def close(self) -> list[str]:
        """Finish the last shard, write the index when there are several; return the files written."""
        if self._pos != len(self._queue):
            raise CheckpointError(f"internal error: {len(self._queue) - self._pos} planned tensors were not written")
        self._close_file()
        files = list(self.names)
        if len(self.shards) > 1:
            total = sum(s.nbytes for shard in self.shards for s in shard)
            weight_map = {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(INDEX_NAME)
        return files

    def abort(self) -> None:
        self._close_file()
