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
    or into a caller's buffer (through an aligned buffer per thread, at most :data:`KEEP_BYTES`, one copy)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _kept(self, nbytes: int) -> tuple[torch.Tensor, int]:
        """This thread's aligned buffer of at least ``nbytes`` (<= :data:`KEEP_BYTES`) and where its alignment
        starts."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes + ALIGN:
            buf = self._local.buf = None  # free the old one first
            buf = self._local.buf = torch.empty(min(KEEP_BYTES, nbytes + nbytes // 4) + ALIGN, dtype=torch.uint8)
        return buf, (-buf.data_ptr()) % ALIGN

    @staticmethod
    def _fill(fd: int, view: memoryview, offset: int, need: int) -> int:
        """Read the aligned span at ``offset`` into ``view`` until ``need`` bytes are in (or the file ends: a short
        read is not retried at an unaligned offset, which some file systems refuse); bytes read."""
        done = 0
        try:
            while done < need:
                got = os.preadv(fd, [view[done:]], offset + done)
                done += got
                if got == 0 or got % ALIGN:
                    break
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise DirectIOUnsupported(exc.errno, "direct reads refused") from exc
            raise
        return done

    def read(self, fd: int, start: int, n: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """``n`` bytes at ``start`` of ``fd`` (opened with ``O_DIRECT``): (the tensor holding them, ``out`` or a new
        one, and how many were read: fewer at the end of the file). Raises :class:`DirectIOUnsupported` where the
        file system refuses aligned direct reads."""
        a0 = start - start % ALIGN
        a1 = -(-(start + n) // ALIGN) * ALIGN
        if out is None:  # a view of an allocation only the alignment larger than the range
            buf = torch.empty(a1 - a0 + ALIGN, dtype=torch.uint8)
            pad = (-buf.data_ptr()) % ALIGN
            done = self._fill(fd, memoryview(buf.numpy())[pad : pad + a1 - a0], a0, start - a0 + n)
            return buf[pad + start - a0 : pad + start - a0 + n], max(0, min(n, done - (start - a0)))
        have = 0  # into out, through the kept buffer, one segment of at most KEEP_BYTES at a time
        for s0 in range(a0, a1, KEEP_BYTES):
            s1 = min(a1, s0 + KEEP_BYTES)
            buf, pad = self._kept(s1 - s0)
            lo, hi = max(start, s0), min(start + n, s1)  # the part of the range in this segment
            done = self._fill(fd, memoryview(buf.numpy())[pad : pad + s1 - s0], s0, hi - s0)
            got = max(0, min(hi, s0 + done) - lo)
            out[lo - start : lo - start + got].copy_(buf[pad + lo - s0 : pad + lo - s0 + got])
            have += got
            if got < hi - lo:
                break
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
    cgroup memory limit (v2 ``memory.max`` or v1's hierarchical limit, of this group and its ancestors, less what
    they use beyond reclaimable file cache); None where it cannot be read."""
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


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2): no limit


def _memory_stat(group: Path) -> dict[str, int]:
    """The numeric fields of a cgroup's ``memory.stat`` (empty when unreadable)."""
    try:
        lines = (group / "memory.stat").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.partition(" ") for line in lines)
    return {name: int(value) for name, _, value in fields if value.strip().isdigit()}


def _group_dir(root: Path, rel: str) -> Path | None:
    """This process's cgroup folder: ``root/rel``, or ``root`` itself inside a container whose cgroup namespace
    mounts its own group there."""
    for d in (root / rel, root):
        if d.is_dir():
            return d
    return None


def _cgroup_room(system: Path = Path("/")) -> int | None:
    """The smallest (limit - usage not reclaimable) over this process's memory cgroup and its ancestors (None: no
    limit, or none readable); ``system``: where ``proc/`` and ``sys/`` are (tests give a copy)."""
    try:
        lines = (system / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2].strip().lstrip("/")
        if controllers == "":  # v2 unified hierarchy: walk up to the mount root
            root = system / "sys/fs/cgroup"
            d = _group_dir(root, rel)
            while d is not None:
                limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
                if limit is not None and used is not None:
                    rooms.append(max(0, limit - max(0, used - _memory_stat(d).get("inactive_file", 0))))
                d = d.parent if d != root and root in d.parents else None
        elif "memory" in controllers.split(","):  # v1: the hierarchical limit covers the ancestors
            d = _group_dir(system / "sys/fs/cgroup/memory", rel)
            if d is None:
                continue
            stat = _memory_stat(d)
            limit = stat.get("hierarchical_memory_limit") or _read_int(d / "memory.limit_in_bytes")
            used = _read_int(d / "memory.usage_in_bytes")
            if limit and used is not None and limit < 1 << 60:  # v1 writes its "no limit" as a huge number
                rooms.append(max(0, limit - max(0, used - stat.get("total_inactive_file", 0))))
    return min(rooms) if rooms else None


def use_direct_reads(mode: str, expert_bytes: int, room: int | None) -> bool:
    """Whether a run reads experts with ``O_DIRECT``: ``"always"``, ``"never"``, or ``"auto"``: when the
    checkpoint's experts are larger than the memory the page cache could still take (``room``; unknown: no)."""
    if mode in ("always", "never"):
        return mode == "always"
    return room is not None and expert_bytes > room
