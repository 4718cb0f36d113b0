"""The `moe-patch` command line: the top layer of the package, over every area it drives.

    entry.py         the parser, one-line errors and exit codes (`moe-patch = "moe_patch.cli:main"`)
    args.py          the argument types every command shares, and the one-line-error parser
    offload_args.py  PATH and how its experts are paged: shared by run, serve and chat
    sampling_args.py --temperature, --top-p, ...: shared by run and chat
    demo.py, inspect.py, run.py, serve.py (serve, chat), upcycle.py, hub.py (push, pull), batch.py
                     one module per command group: argument wiring and printing; the work is in the library
    batch_jobs.py    the batch plan and its runner, which drives converters and hub_scripts together

Nothing here is imported by the library. Importing this package imports no command module (``main``
imports them when it runs), so ``moe_patch.cli.args`` comes alone.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `moe-patch` command on ``argv`` (default: the process's arguments); returns the exit status."""
    from .entry import main as run_command

    return run_command(argv)
