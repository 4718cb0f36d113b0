"""Byte sizes: the one parser (``"8GiB"`` -> bytes) and the one formatter (bytes -> ``"8.00 GiB"``).

Every size a user types (``--max-shard-size``, ``--expert-cache``, ``--host-cache``, ``--gpu``,
``--ram``, ``load_model(expert_cache=...)``) goes through :func:`parse_size`, so ``5GB`` means the same
everywhere: 5 * 10**9 bytes, as in transformers' ``max_shard_size``.

transformers' own ``convert_file_size_to_int`` (``transformers.utils.hub``) is not used because it
accepts integers only (no ``1.5GiB``), has no ``TB``/``TiB`` and no bare byte counts as strings, reads a
lowercase ``b`` as *bits* (``"5Gb"`` is 625 MB there, while every budget here is in bytes) and its
error names no unit. For every string it accepts with an uppercase ``B`` this parser returns the same
number (tests/e2e/test_bad_inputs.py checks it against transformers).
"""

from __future__ import annotations

import math
import re

from .errors import InvalidArgumentError

_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# One-letter units are binary, as in `docker --memory 8g`, `java -Xmx8g` and `free -g`.
_SHORT = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
UNITS: dict[str, int] = {"": 1, "b": 1, **_DECIMAL, **_BINARY, **_SHORT}
#: What every size error message says is accepted.
ACCEPTED = (
    "a number of bytes, or a number with a unit: KB, MB, GB, TB (powers of 1000), "
    "KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024); e.g. 8GiB, 500MB, 1.5G"
)
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(
    value: int | float | str,
    *,
    name: str = "size",
    minimum: int = 0,
    error: type[InvalidArgumentError] = InvalidArgumentError,
) -> int:
    """Bytes for ``value``: an int or float byte count, or a string such as ``"8GiB"`` or ``"500 MB"``.

    Units are case-insensitive. Raises ``error`` (an :class:`InvalidArgumentError` subclass) naming
    ``name`` (left out when empty), the value and the accepted units, for anything else or a size
    below ``minimum`` bytes.
    """
    where = f"{name}: " if name else ""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise error(f"{where}expected a size, got {value!r}; write {ACCEPTED}.")
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in UNITS:
            sign = " (sizes cannot be negative)" if value.strip().startswith("-") else ""
            raise error(f"{where}cannot read {value!r} as a size{sign}; write {ACCEPTED}.")
        size = float(m.group(1)) * UNITS[unit]
    else:
        size = value
    if not math.isfinite(size) or size < 0:
        raise error(f"{where}a size must be a finite, non-negative number, got {value!r}; write {ACCEPTED}.")
    size = int(size)
    if size < minimum:
        raise error(f"{where}{value!r} is {size} bytes; it must be at least {format_bytes(minimum)}.")
    return size


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1: ``512 B``, ``1.50 KiB``, ``8.00 GiB``."""
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"
