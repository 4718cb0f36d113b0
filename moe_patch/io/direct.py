"""Reads that bypass the page cache (``O_DIRECT``), and the rule that decides when a run uses them.

A buffered read copies each byte through the page cache into the caller's buffer and leaves the page cache to be
reclaimed when memory is short: on a 2-core machine decoding an MXFP4 model from disk under a 1.75 GiB RAM +
page-cache cap, the reader threads' kernel time slowed the kernels beside them (decode 6.6-7.3 tok/s buffered,
8.9-9.3 direct; a gpt-oss-120b-shaped checkpoint under 20 GiB: 0.40 against 0.61; docs/benchmarks.md). When the
experts that miss the caches cannot stay in the page cache anyway (the checkpoint's experts are larger than the
memory left for it), a direct read is the cheaper one. When they can, the page cache is a free second host tier,
so buffered reads stay the default there.

``O_DIRECT`` needs the file offset, the length and the buffer address aligned to the device's block size; tensors
in a safetensors file start anywhere, so the aligned span around the range is read: into a new aligned allocation
whose view is the result (no copy), or, for a caller's buffer, into a per-thread aligned buffer and copied out. No
library does this for positional reads (numpy, safetensors and huggingface_hub all read through the page cache),
hence this module.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import torch

#: alignment of offsets, lengths and addresses (covers 512-byte and 4 KiB logical blocks)
ALIGN = 4096
#: smaller ranges stay buffered: their cost is the request, not the copy
MIN_DIRECT_BYTES = 1 << 20


class DirectIOUnsupported(OSError):
    """The file system refuses ``O_DIRECT`` (tmpfs, some network file systems): read through the page cache."""


#: per-thread aligned buffers are kept up to this size (an expert's tensors); larger reads use a temporary one
KEEP_BYTES = 64 << 20


class DirectReader:
    """Positional ``O_DIRECT`` reads of byte ranges: into a new tensor (a view of an aligned allocation, no copy)
    or into a caller's buffer (through an aligned buffer per thread, one copy)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _aligned(self, nbytes: int) -> tuple[torch.Tensor, int]:
        """An aligned buffer of at least ``nbytes`` bytes (this thread's, when small enough to keep) and the offset
        where the alignment starts."""
        if nbytes > KEEP_BYTES:  # e.g. an embedding at load: never kept for the life of the thread
            buf = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            return buf, (-buf.data_ptr()) % ALIGN
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes + ALIGN:
            self._local.buf = None  # free the old one first
            buf = self._local.buf = torch.empty(min(KEEP_BYTES, nbytes + nbytes // 4) + ALIGN, dtype=torch.uint8)
        return buf, (-buf.data_ptr()) % ALIGN

    def read(self, fd: int, start: int, n: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """``n`` bytes at ``start`` of ``fd`` (opened with ``O_DIRECT``): (the tensor holding them, ``out`` or a new
        one, and how many were read: fewer at the end of the file). Raises :class:`DirectIOUnsupported` where the
        file system refuses aligned direct reads."""
        a0 = start - start % ALIGN
        a1 = -(-(start + n) // ALIGN) * ALIGN
        if out is None:
            buf = torch.empty(a1 - a0 + ALIGN, dtype=torch.uint8)
            pad = (-buf.data_ptr()) % ALIGN
        else:
            buf, pad = self._aligned(a1 - a0)
        view = memoryview(buf.numpy())[pad : pad + a1 - a0]
        done = 0
        try:
            while done < a1 - a0:
                got = os.preadv(fd, [view[done:]], a0 + done)
                if got == 0:
                    break
                done += got
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise DirectIOUnsupported(exc.errno, "direct reads refused") from exc
            raise
        have = max(0, min(n, done - (start - a0)))
        data = buf[pad + start - a0 : pad + start - a0 + n]
        if out is None:  # a view: the allocation is only the alignment larger than the range
            return (data if (start - a0) % 16 == 0 else data.clone()), have  # dtype views need aligned offsets
        out[:have].copy_(data[:have])
        return out, have


def open_direct(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path`` that bypasses the page cache; :class:`DirectIOUnsupported` where the
    platform or file system has no ``O_DIRECT``."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        raise DirectIOUnsupported(errno.EINVAL, "no O_DIRECT on this platform")
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise DirectIOUnsupported(exc.errno, f"{path}: the file system refuses O_DIRECT") from exc
        raise


def page_cache_room() -> int | None:
    """Bytes this process could still fill with page cache: the machine's available memory, or less under a
    cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, less what the group uses); None where
    it cannot be read."""
    room = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_room()
    if limit is not None:
        room = limit if room is None else min(room, limit)
    return room


def _cgroup_room() -> int | None:
    """The memory limit of this process's cgroup less its usage (None: no limit or none readable)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2].lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            base = Path("/sys/fs/cgroup") / rel
            files = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit_text = (base / files[0]).read_text().strip()
            if limit_text == "max":
                continue
            limit, used = int(limit_text), int((base / files[1]).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1's "no limit"
            continue
        return max(0, limit - used)
    return None


def use_direct_reads(mode: str, expert_bytes: int, room: int | None) -> bool:
    """Whether a run reads experts with ``O_DIRECT``: ``"always"``, ``"never"``, or ``"auto"``: when the
    checkpoint's experts are larger than the memory the page cache could still take (``room``; unknown: no)."""
    if mode in ("always", "never"):
        return mode == "always"
    return room is not None and expert_bytes > room
