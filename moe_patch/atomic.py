"""Outputs written atomically, and the leftovers of runs that were killed.

Every folder or file moe-patch writes for the user (an upcycled checkpoint, the demo checkpoint, a
model card) is built under a hidden sibling name and renamed into place when complete, so the target
is absent, the old version, or the complete new one. The sibling is named
``.NAME.tmp-HOST-PID-RANDOM`` (``.NAME.old-...`` for the version being replaced): a process killed
with SIGKILL cannot clean up, and the owner's host and pid in the name let a later run recognise the
leftover (same host, that pid no longer alive) and remove it. Leftovers it cannot prove dead (another
host on a shared file system, a live pid, names from older versions) are reported with their size
and place instead. Python's tempfile gives no owner in the name, hence this module.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError, OutputError
from .sizes import format_bytes

logger = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _prefix(name: str, kind: str = "tmp") -> str:
    return f".{name}.{kind}-{_host()}-{os.getpid()}-"


def _leftover(name: str) -> re.Pattern[str]:
    # tempfile's random suffix has no '-', so the owner part is unambiguous; without it, an older name.
    return re.compile(rf"\.{re.escape(name)}\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?[a-z0-9_]+")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by another user
        return True
    return True


def disk_usage(path: Path) -> int:
    """Bytes held by the files under ``path`` (a file or a folder)."""
    if not path.is_dir():
        return path.stat().st_size if path.exists() else 0
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed runs of this host left next to ``target``; return them.

    A run killed while replacing ``target`` may have moved the old version aside without putting the
    new one in place: the old version is then moved back. Leftovers whose owner may still be running
    (another host, a live pid) or that carry no owner are kept and logged with their size and path.
    """
    target = Path(target).absolute()
    try:
        entries = sorted(os.scandir(target.parent), key=lambda e: e.name)
    except OSError:
        return []
    pattern, host, removed = _leftover(target.name), _host(), []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        path = Path(entry.path)
        pid = int(m["pid"]) if m["pid"] else None
        if pid is None or m["host"] != host or _alive(pid):
            owner = f"pid {pid} on {m['host']}" if pid is not None else "an older moe-patch"
            logger.warning(
                "%s (%s) is a temporary copy of %s written by %s; if no run is writing %s any more, "
                "delete it to free the space.",
                path,
                format_bytes(disk_usage(path)),
                target.name,
                owner,
                target,
            )
            continue
        if m["kind"] == "old" and not target.exists() and (path / target.name).exists():
            os.replace(path / target.name, target)
            logger.warning("%s: restored the previous version from %s (a run replacing it was killed).", target, path)
        size = disk_usage(path)
        _remove(path)
        removed.append(path)
        logger.warning("removed %s (%s), left by a run that was killed (pid %d).", path, format_bytes(size), pid)
    return removed


@functools.cache
def _umask() -> int:
    # Reading the umask means setting it: done once, so other threads are not exposed again and again.
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _os_error(target: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"{target}: writing failed ({reason}); nothing was written to {target}.")


@contextmanager
def atomic_dir(out: str | os.PathLike, *, replace: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it becomes ``out``, on any failure it vanishes.

    An existing ``out`` is replaced only with ``replace``, and only once the new one is complete. OS
    errors (disk full, read-only file system) become :class:`OutputError` naming ``out``.
    """
    out = Path(out)
    if out.exists() and not replace:
        raise OutputError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; refusing to replace it.")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output's parent folder ({exc.strerror}).") from None
    clean_leftovers(out)
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise OutputError(
            f"{parent}: {format_bytes(free)} free, the output needs {format_bytes(needed_bytes)}; "
            "free some space or choose another output folder."
        )
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out.name), dir=parent))
    except OSError as exc:
        raise _os_error(out, exc) from exc
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would survive the rename: other users could not read OUT
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(out.name, "old"), dir=parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)  # keep the old version rather than none
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise _os_error(out, exc) from exc
        raise


def _check_name(path: Path) -> None:
    # the OS refuses a NUL in a path with a ValueError, which is not an OSError
    if "\x00" in os.fspath(path):
        raise OutputError(f"{os.fspath(path)!r}: a path cannot contain a NUL character; nothing was written.")


def make_parent(path: str | os.PathLike) -> None:
    """Create the missing folders above ``path``; one :class:`OutputError` naming the folder when that fails (a
    file in the way, no permission, a read-only file system)."""
    path = Path(path)
    _check_name(path)
    folder = path.parent
    for above in (*reversed(folder.parents), folder):
        if above.exists() and not above.is_dir():
            raise OutputError(f"{folder}: cannot create the folder ({above} is a file); nothing was written to {path}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot create the folder ({exc.strerror or exc}); nothing was written to {path}."
        ) from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (never a half-written file)."""
    path = Path(path)
    _check_name(path)
    clean_leftovers(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), dir=path.parent)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _os_error(path, exc) from exc
        raise
