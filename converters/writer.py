"""Streaming safetensors writer and atomic output folders.

Every output tensor's name, shape and dtype is known before any weight is computed, so each shard's
header is written first and tensors are streamed into it one at a time: memory holds one tensor, not
one shard. The bytes follow the safetensors format exactly (8-byte little-endian header length, JSON
header padded with spaces to a multiple of 8, contiguous data), and the header is written with sorted
keys, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_patch.errors import CheckpointError

from .checkpoint import INDEX_NAME, TORCH_TO_ST

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"


class OutputError(CheckpointError):
    """The output folder exists, cannot be created, or could not be written completely (disk full)."""


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


def parse_size(size: str | int) -> int:
    """'5GB' / '500MiB' / 1000 -> bytes (decimal for GB/MB/KB, binary for GiB/MiB/KiB, like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"--max-shard-size {size!r}: expected a size like 5GB, 500MB or 2GiB.")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    mult.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(value * mult[unit])


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


@contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on any failure it vanishes.

    An interrupted run (exception, Ctrl-C) leaves ``out`` untouched: it is either absent, the old
    folder (with ``overwrite``) or the complete new one.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; refusing to replace it.")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output's parent folder ({exc.strerror}).") from None
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise OutputError(
            f"{parent}: {free / 1e9:.2f} GB free, the output needs {needed_bytes / 1e9:.2f} GB; free some space "
            "or choose another OUT."
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would survive the rename: other users could not read OUT
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OutputError(f"{out}: writing failed ({reason}); nothing was written to {out}.") from exc
        raise
