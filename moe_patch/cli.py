"""The `moe-patch` command: one parser, subcommands that call the library.

Each area registers its own subcommands (`register(subparsers)`) next to the code it drives, so this
file holds no logic: it builds the parser, runs the chosen handler and turns errors into short messages.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import MoEPatchError

logger = logging.getLogger("moe_patch")


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
    parser = argparse.ArgumentParser(
        prog="moe-patch",
        description="Detect, patch, offload, upcycle and publish Mixture-of-Experts models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("moe-patch: interrupted; no partial output was kept.", file=sys.stderr)
        return 130
    except (MoEPatchError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"moe-patch {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
