"""The argument types every `moe-patch` command shares, and the parser class that prints one-line errors.

They sit at the bottom of the command-line layer (nothing of moe-patch but its errors and the size parser
below them), so that every value argparse accepts is one the code can use (`--max-new-tokens 0` is refused
here, with the allowed range, not deep inside generation).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ..errors import MoEPatchError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``moe-patch run: error: argument --x: ... (see moe-patch run --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see `{self.prog} --help`)\n")


# -- argument types (argparse calls them on the raw string; ArgumentTypeError becomes the message) ----------
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def size(minimum: int = 0, *, auto: bool = False) -> Callable[[str], str]:
    """A byte size the one size parser reads (``8GiB``, ``500MB``, ``4096B``); the text is kept as given, so a
    recorded command line shows what the user typed. A number without a unit is refused (``--gpu 24`` meant
    24 GiB, not 24 bytes), except 0; ``auto`` passes where the option has an automatic value."""

    def parse(text: str) -> str:
        from ..sizes import parse_size

        if auto and text.strip().lower() == "auto":
            return "auto"
        number = text.strip()
        if number.replace(".", "", 1).isdigit() and float(number) != 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} has no unit; give a unit, e.g. {number}GiB or {number}MB ({number}B for bytes)"
            )
        try:
            parse_size(text, name="", minimum=minimum)  # argparse names the option
        except MoEPatchError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = "size"
    return parse


def non_empty(text: str) -> str:
    """Any valid UTF-8 text but the empty string (an empty prompt gives the model nothing to continue; bytes that
    are not UTF-8 are refused, naming the first, rather than replaced: ``moe_patch.text``)."""
    from ..text import text_problem

    problem = text_problem(text, from_bytes=True)  # argv is decoded with surrogateescape
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}; give the text in UTF-8")
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def prompt_file(text: str) -> str:
    """The text of a file, or of standard input for ``-``: the prompt, under the same checks as ``--prompt``
    (UTF-8, not empty). Its size against the model's context is checked once the config is read."""
    import sys

    try:
        data = sys.stdin.buffer.read() if text == "-" else Path(text).expanduser().read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror or exc}") from None
    where = "standard input" if text == "-" else text
    try:
        return non_empty(data.decode("utf-8", errors="surrogateescape"))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{where}: {exc}") from None


def token_ids(text: str) -> list[int]:
    """Comma-separated token ids, each >= 0, at least one (the upper bound is the model's vocabulary)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        ids = [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id, e.g. 1,2,3")
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {min(ids)}")
    if max(ids) >= 2**63:  # not even a torch.long; the vocabulary bound is checked once the config is read
        raise argparse.ArgumentTypeError(f"token id {max(ids)} is far above any vocabulary")
    return ids


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is checked when it is used;
    ``auto`` is resolved then: CUDA when torch sees a GPU, else the CPU)."""
    kind, _, index = text.partition(":")
    if text == "auto":
        return text
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def new_folder(text: str) -> Path:
    """A folder to write into: absent (it is created) or an existing folder, never an existing file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def plot_file(text: str) -> Path:
    """An image file to write: its folder exists, its suffix is a format matplotlib writes, and matplotlib
    is installed (checked now, so a long run does not end in an ImportError)."""
    path = Path(text).expanduser()
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name such as experts.png")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {path.parent} (read-only or no permission)")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise argparse.ArgumentTypeError("plotting needs matplotlib: pip install matplotlib") from None
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(f"{text}: the suffix must be one of {', '.join('.' + f for f in formats)}")
    return path
