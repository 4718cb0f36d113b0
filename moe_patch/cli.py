"""The `moe-patch` command: one parser, subcommands that call the library.

Each area registers its own subcommands (`register(subparsers)`) next to the code it drives, so this
file holds no command logic: it builds the parser, runs the chosen handler and turns errors into one
line each. It also holds the argument types the areas share, so that every value argparse accepts is
one the code can use (`--max-new-tokens 0` is refused here, with the allowed range, not deep inside
generation).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .errors import MoEPatchError

logger = logging.getLogger("moe_patch")


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


def size(minimum: int = 0) -> Callable[[str], str]:
    """A byte size the one size parser reads (``8GiB``, ``500MB``, a byte count); the text is kept as given,
    so a recorded command line shows what the user typed."""

    def parse(text: str) -> str:
        from .sizes import parse_size

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
    from .text import text_problem

    problem = text_problem(text, from_bytes=True)  # argv is decoded with surrogateescape
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}; give the text in UTF-8")
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


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
    """``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is checked when it is used)."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
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


# -- the command ---------------------------------------------------------------------------------------------
def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    # Imported lazily so `moe-patch --help` stays fast and one broken area cannot hide the others.
    from . import commands

    regs = [commands.register]
    try:
        from .offload import cli as offload_cli

        regs.append(offload_cli.register)
    except ImportError:  # pragma: no cover - area not installed
        pass
    try:
        from .serve import cli as serve_cli

        regs.append(serve_cli.register)
    except ImportError:  # pragma: no cover
        pass
    try:
        from converters import cli as converters_cli

        regs.append(converters_cli.register)
    except ImportError:  # pragma: no cover
        pass
    try:
        from hub_scripts import cli as hub_cli

        regs.append(hub_cli.register)
    except ImportError:  # pragma: no cover
        pass
    return regs


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="moe-patch",
        description="Detect, patch, offload, upcycle and publish Mixture-of-Experts models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # subparsers are ArgumentParser too
    for register in _registrars():
        register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand they were given to, not by `moe-patch`
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    where = f"moe-patch {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("moe-patch: interrupted; no partial output was kept.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moe-patch inspect ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except MoEPatchError as exc:
        if args.debug:
            raise
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # the file system said no: name the file and the reason
        if args.debug:
            raise
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"{where}: error: {name}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line, and how to get the details
        if args.debug:
            raise
        print(f"{where}: internal error: {type(exc).__name__}: {_one_line(exc)} (re-run with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
