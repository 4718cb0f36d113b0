"""A safetensors checkpoint folder opened for positional reads: every tensor by key, read as exact byte ranges.

Tensors are read with ``os.preadv`` at the offsets the safetensors header gives, instead of through
``safe_open``'s memory map, because:

- a shard truncated or replaced while a model runs turns a mapped read into SIGBUS (the process
  dies); a positional read comes back short and becomes a :class:`CheckpointError`;
- mapped pages count in the process RSS, which would hide the cache budgets (and the converter's
  bounded memory);
- bytes can land directly in a caller's buffer (pinned host memory on CUDA).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from .direct import MIN_DIRECT_BYTES, DirectIOUnsupported, DirectReader, open_direct
from .index import INDEX_NAME, read_index, read_shards
from .safetensors import TensorEntry, read_header

logger = logging.getLogger(__name__)


def checkpoint_entries(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in ``directory``: those its index lists (checked against the shards),
    else those of every ``*.safetensors`` file in it."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        index = read_index(index_path)
        headers = read_shards(index)
        return {key: headers[shard][key] for shard, keys in index.keys_by_shard().items() for key in keys}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{directory}: no {INDEX_NAME} and no .safetensors file. moe-patch offloads from "
            "safetensors checkpoints only (never pickle)."
        )
    entries: dict[str, TensorEntry] = {}
    for fpath in files:
        entries.update(read_header(fpath))
    return entries


class Checkpoint:
    """All tensors of a safetensors checkpoint directory, indexed by key; reads byte ranges.

    Construction reads every shard header and checks the index against them, so a missing or
    truncated shard or a tensor absent from its shard is reported before anything runs; a caller
    that has read and checked the headers its own way passes ``entries`` instead.
    File descriptors stay open for the life of the object (``close()`` releases them).

    ``direct``: ranges of at least 1 MiB are read past the page cache (``O_DIRECT``, :mod:`.direct`); where the
    file system refuses it, reads fall back to the page cache with one log line.
    """

    def __init__(self, directory: str | os.PathLike, entries: Mapping[str, TensorEntry] | None = None):
        self.directory = Path(directory)
        self.entries: dict[str, TensorEntry] = (
            dict(entries) if entries is not None else checkpoint_entries(self.directory)
        )
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.direct = False
        self._direct_reader = DirectReader()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"{file}: cannot open shard ({exc.strerror}).") from exc
                if hasattr(os, "posix_fadvise"):
                    # experts are read as exact byte ranges in routing order: readahead would read (and count
                    # in RSS-free page cache) neighbouring experts nobody asked for, 3x the bytes on the bench
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[file] = fd
            return fd

    def _direct_fd(self, file: str) -> int:
        with self._lock:
            fd = self._direct_fds.get(file)
            if fd is None:
                fd = self._direct_fds[file] = open_direct(file)
            return fd

    def read_bytes(
        self, entry: TensorEntry, start: int, end: int, out: torch.Tensor | None = None, align: int = 1
    ) -> torch.Tensor:
        """Read ``[start, end)`` of ``entry``'s file into a uint8 tensor (``out`` if given, e.g. pinned); a new one
        starts at an address divisible by ``align`` (the element size the caller will view it as)."""
        n = end - start
        if out is not None and (out.numel() != n or out.dtype != torch.uint8):
            raise ValueError(f"read buffer must be {n} uint8 elements")
        buf, done = out, 0
        try:
            if self.direct and n >= MIN_DIRECT_BYTES and (out is None or out.is_contiguous()):
                try:
                    buf, done = self._direct_reader.read(self._direct_fd(entry.file), start, n, out)
                except DirectIOUnsupported as exc:
                    logger.info("%s: reading through the page cache (%s)", self.directory, exc.strerror)
                    self.direct = False
                if done == n:  # a direct read without a buffer is a view at the file offset's alignment
                    return buf if out is not None or buf.data_ptr() % align == 0 else buf.clone()
                if out is None and buf is not None:  # cut short: the rest through the page cache, which reports it
                    buf = torch.empty(n, dtype=torch.uint8).copy_(buf)
            if buf is None:
                buf = torch.empty(n, dtype=torch.uint8)
            view = memoryview(buf.numpy()) if n else memoryview(b"")
            while done < n:  # preadv may return short counts for large reads
                got = os.preadv(self._fd(entry.file), [view[done:]], start + done)
                if got == 0:
                    break
                done += got
        except OSError as exc:
            raise CheckpointError(
                f"{entry.file}: reading tensor {entry.key!r} failed ({exc.strerror or exc}). The shard changed or "
                "the disk failed while the model was running."
            ) from exc
        if done != n:
            raise CheckpointError(
                f"{entry.file}: tensor {entry.key!r} is cut short ({done} of {n} bytes at offset {start}); the shard "
                "was truncated or replaced while the model was running."
            )
        return buf

    def read(
        self, entry: TensorEntry, row: int | None = None, out: torch.Tensor | None = None, split: int | None = None
    ) -> torch.Tensor:
        """The tensor ``entry`` (or its ``row`` along the first dimension, or chunk ``row`` of ``split``),
        in its stored dtype."""
        if row is None:
            start, end, shape = entry.start, entry.end, entry.shape
        else:
            (start, end), shape = entry.row_range(row, split), entry.row_shape(split)
        raw = self.read_bytes(entry, start, end, out, align=entry.dtype.itemsize)
        return raw.view(entry.dtype).reshape(shape)

    def read_block(self, entry: TensorEntry, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """``tensor[rows, cols]`` (slices of the first two dimensions, step 1) in its stored dtype, reading
        only those bytes: one read for a block of whole rows, one read per row for a block of columns (the
        converter's neuron slices of a down projection)."""
        if not entry.shape:
            if rows is not None or cols is not None:
                raise ValueError(f"tensor {entry.key!r} is a scalar; it has no rows or columns to slice")
            return self.read(entry)
        r0, r1 = _span(rows, entry.shape[0])
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        if cols is None:
            raw = self.read_bytes(
                entry, entry.start + r0 * row_bytes, entry.start + r1 * row_bytes, align=entry.dtype.itemsize
            )
            return raw.view(entry.dtype).reshape(r1 - r0, *entry.shape[1:])
        if len(entry.shape) < 2:
            raise ValueError(f"tensor {entry.key!r} of shape {list(entry.shape)} has no columns to slice")
        c0, c1 = _span(cols, entry.shape[1])
        col_bytes = row_bytes // entry.shape[1] if entry.shape[1] else 0
        out = torch.empty((r1 - r0, c1 - c0, *entry.shape[2:]), dtype=entry.dtype)
        flat, n = out.view(-1).view(torch.uint8), (c1 - c0) * col_bytes
        for i, row in enumerate(range(r0, r1)):
            at = entry.start + row * row_bytes + c0 * col_bytes
            self.read_bytes(entry, at, at + n, out=flat.narrow(0, i * n, n))
        return out

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._direct_fds.values()]:
                os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _span(part: slice | None, length: int) -> tuple[int, int]:
    """``[start, stop)`` of a step-1 slice of ``length`` items, clamped as Python slicing clamps."""
    if part is None:
        return 0, length
    start, stop, step = part.indices(length)
    if step != 1:
        raise ValueError(f"only step-1 slices are read, got {part}")
    return start, max(start, stop)
