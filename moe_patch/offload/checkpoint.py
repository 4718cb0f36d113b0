"""The checkpoint's own safetensors files: headers, the shard index, and positional reads.

This is the only place that touches checkpoint bytes. Tensors are read with ``os.preadv`` at the
offsets the safetensors header gives, instead of through ``safe_open``'s memory map, because:

- a shard truncated or replaced while a model runs turns a mapped read into SIGBUS (the process
  dies); a positional read comes back short and becomes a :class:`CheckpointError`;
- mapped pages count in the process RSS, which would hide the cache budgets;
- bytes can land directly in a caller's buffer (pinned host memory on CUDA).

The header format (8-byte little-endian length, JSON of ``{name: {dtype, shape, data_offsets}}``,
then the data) is the documented safetensors layout.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

#: safetensors dtype codes -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):  # e8m0 scales (ue8m0 FP8, MX formats); torch >= 2.7
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
# the other element types safetensors writes, so a valid file is never refused (push validates with this reader)
DTYPES.update({code: getattr(torch, name) for code, name in
               (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"))
               if hasattr(torch, name)})
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20  # safetensors refuses headers above 100 MB too


@dataclass(frozen=True)
class TensorEntry:
    """Where one checkpoint tensor lives: file, absolute byte range, dtype and shape."""

    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def row_range(self, index: int, split: int | None = None) -> tuple[int, int]:
        """Byte range of ``tensor[index]``, or with ``split`` of chunk ``index`` of ``split`` equal chunks
        along the first dimension (DBRX's ``[E * F, H]`` experts). The first dimension is outermost, so
        either is one contiguous range."""
        n = self.shape[0] if self.shape else 0
        split = split or n
        if not self.shape or not 0 <= index < split or n % split:
            raise CheckpointError(
                f"{self.file}: tensor {self.key!r} of shape {list(self.shape)} has no "
                + (f"row {index}." if split == n else f"chunk {index} of {split}.")
            )
        row = self.nbytes // split
        return self.start + index * row, self.start + (index + 1) * row

    def row_shape(self, split: int | None = None) -> tuple[int, ...]:
        """Shape of one row (``split`` None) or of one of ``split`` chunks along the first dimension."""
        if split is None or split == self.shape[0]:
            return self.shape[1:]
        return (self.shape[0] // split, *self.shape[1:])


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header and check the file holds every byte it promises."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header (truncated?).")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated or not safetensors).")
            header = json.loads(fh.read(n))
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: shard file is missing. Re-download the checkpoint.") from exc
    except PermissionError as exc:
        raise CheckpointError(f"{path}: permission denied; make the file readable (chmod a+r) and retry.") from exc
    except OSError as exc:  # a folder where a file should be, an I/O error
        raise CheckpointError(f"{path}: cannot read the shard ({exc.strerror or exc}).") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid safetensors JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a safetensors JSON object. The file is corrupt.")
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {info.get('dtype')!r}, which moe-patch cannot read.")
            shape = tuple(int(s) for s in info["shape"])
            begin, stop = (int(x) for x in info["data_offsets"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r}. The file is corrupt.") from exc
        if min(shape, default=0) < 0 or not 0 <= begin <= stop:
            raise CheckpointError(f"{path}: tensor {key!r} has negative sizes or offsets in its header. The file is corrupt.")
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if stop - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {key!r} claims {stop - begin} bytes but dtype {info['dtype']} and shape "
                f"{list(shape)} need {expected}. The file is corrupt."
            )
        if base + stop > size:
            raise CheckpointError(
                f"{path}: tensor {key!r} ends at byte {base + stop} but the file has {size} bytes: the shard is "
                "truncated. Re-download it."
            )
        out[key] = TensorEntry(key, path, dtype, shape, base + begin, base + stop)
    _check_layout(path, out.values(), base, size)
    return out


def _check_layout(path: str, entries, base: int, size: int) -> None:
    """The data of a safetensors file is its tensors back to back, nothing between, over or after them
    (the library refuses any other file: a pushed shard that passes here loads everywhere)."""
    at = base
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start != at:
            what = "overlaps the tensor before it" if entry.start < at else f"leaves {entry.start - at} bytes unused before it"
            raise CheckpointError(f"{path}: tensor {entry.key!r} {what}, which safetensors refuses. The file is corrupt.")
        at = entry.end
    if at != size:
        raise CheckpointError(f"{path}: {size - at} bytes follow the last tensor, which safetensors refuses. "
                              "The file is corrupt (or was appended to).")


class Checkpoint:
    """All tensors of a safetensors checkpoint directory, indexed by key; reads byte ranges.

    Construction reads every shard header and checks the index against them, so a missing or
    truncated shard or a tensor absent from its shard is reported before anything runs.
    File descriptors stay open for the life of the object (``close()`` releases them).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        self.entries: dict[str, TensorEntry] = {}
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or UTF-8
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc}).") from exc
            except OSError as exc:
                raise CheckpointError(f"{index_path}: cannot read the index ({exc.strerror or exc}).") from exc
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: not a valid safetensors index (weight_map is not an object).")
            by_file: dict[str, list[str]] = {}
            for key, fname in weight_map.items():
                by_file.setdefault(fname, []).append(key)
            for fname, keys in sorted(by_file.items()):
                fpath = self.directory / fname
                if not fpath.is_file():
                    raise CheckpointError(
                        f"{fpath}: shard listed in {INDEX_NAME} is missing (it holds {keys[0]!r} and "
                        f"{len(keys) - 1} more tensors). Re-download the checkpoint."
                    )
                header = read_header(fpath)
                for key in keys:
                    if key not in header:
                        raise CheckpointError(f"{fpath}: tensor {key!r} is listed in {INDEX_NAME} but absent from the shard.")
                    self.entries[key] = header[key]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{self.directory}: no {INDEX_NAME} and no .safetensors file. moe-patch offloads from "
                    "safetensors checkpoints only (never pickle)."
                )
            for fpath in files:
                self.entries.update(read_header(fpath))
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

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

    def read_bytes(self, entry: TensorEntry, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``[start, end)`` of ``entry``'s file into a uint8 tensor (``out`` if given, e.g. pinned)."""
        n = end - start
        buf = out if out is not None else torch.empty(n, dtype=torch.uint8)
        if buf.numel() != n or buf.dtype != torch.uint8:
            raise ValueError(f"read buffer must be {n} uint8 elements")
        view = memoryview(buf.numpy()) if n else memoryview(b"")
        done = 0
        try:
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

    def read(self, entry: TensorEntry, row: int | None = None, out: torch.Tensor | None = None,
             split: int | None = None) -> torch.Tensor:
        """The tensor ``entry`` (or its ``row`` along the first dimension, or chunk ``row`` of ``split``),
        in its stored dtype."""
        if row is None:
            start, end, shape = entry.start, entry.end, entry.shape
        else:
            (start, end), shape = entry.row_range(row, split), entry.row_shape(split)
        raw = self.read_bytes(entry, start, end, out)
        return raw.view(entry.dtype).reshape(shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
