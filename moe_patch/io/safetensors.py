"""The safetensors file format: one file's header, read and checked against the file.

The header format (8-byte little-endian length, JSON of ``{name: {dtype, shape, data_offsets}}``,
then the data) is the documented safetensors layout. Every reader of checkpoint files in moe-patch
(offload, inspect, upcycle, push) parses headers here, so a missing, unreadable, truncated or malformed
shard is told apart, and named with its tensor, the same way everywhere.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

#: safetensors dtype codes -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):  # e8m0 scales (ue8m0 FP8, MX formats); torch >= 2.7
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
# the other element types safetensors writes, so a valid file is never refused (push validates with this reader)
DTYPES.update(
    {
        code: getattr(torch, name)
        for code, name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"))
        if hasattr(torch, name)
    }
)
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
                raise CheckpointError(
                    f"{path}: header length {n} does not fit in a {size}-byte file (truncated or not safetensors)."
                )
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
                raise CheckpointError(
                    f"{path}: tensor {key!r} has dtype {info.get('dtype')!r}, which moe-patch cannot read."
                )
            shape = tuple(int(s) for s in info["shape"])
            begin, stop = (int(x) for x in info["data_offsets"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: tensor {key!r} has a malformed header entry {info!r}. The file is corrupt."
            ) from exc
        if min(shape, default=0) < 0 or not 0 <= begin <= stop:
            raise CheckpointError(
                f"{path}: tensor {key!r} has negative sizes or offsets in its header. The file is corrupt."
            )
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
            what = (
                "overlaps the tensor before it"
                if entry.start < at
                else f"leaves {entry.start - at} bytes unused before it"
            )
            raise CheckpointError(
                f"{path}: tensor {entry.key!r} {what}, which safetensors refuses. The file is corrupt."
            )
        at = entry.end
    if at != size:
        raise CheckpointError(
            f"{path}: {size - at} bytes follow the last tensor, which safetensors refuses. "
            "The file is corrupt (or was appended to)."
        )
