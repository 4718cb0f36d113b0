"""The `moe-patch` command: one parser, subcommands that call the library.

Each command group has a module in this package with a ``register(subparsers)`` that adds its
subcommands; this file holds no command logic: it builds the parser from all of them, runs the chosen
handler and turns errors into one line each. Every command is always registered: a broken import in the
layer fails loudly here, and a command whose optional extra is missing says so when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import MoEPatchError
from .args import ArgumentParser


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    # Imported here, not at the top, so that `moe_patch.cli.args` can be imported without every command;
    # the command modules themselves import only argparse wiring (the library is imported when a command runs).
    from . import batch, demo, hub, inspect, run, serve, upcycle

    return [
        demo.register,
        inspect.register,
        run.register,
        serve.register,
        upcycle.register,
        hub.register,
        batch.register,
    ]


def version_text() -> str:
    """``moe-patch X (transformers Y, torch Z)``: the installed distributions, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"moe-patch {installed('moe-patch')} (transformers {installed('transformers')}, torch {installed('torch')})"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="moe-patch",
        description="Detect, patch, offload, upcycle and publish Mixture-of-Experts models.",
    )
    debug_help = "show full tracebacks and debug logs"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # subparsers are ArgumentParser too
    for register in _registrars():
        register(sub)
    # errors say "re-run with --debug": it works after the command too (an alias shares its command's parser)
    for command in {id(p): p for p in sub.choices.values()}.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
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
        print(f"{where}: error: {' '.join(exc.cli_message.split())}", file=sys.stderr)
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
        print(
            f"{where}: internal error: {type(exc).__name__}: {_one_line(exc)} (re-run with --debug for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
