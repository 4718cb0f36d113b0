"""Errors raised by moe-patch. Each message says what went wrong, where, and what to do.

Every error moe-patch raises on purpose is a :class:`MoEPatchError`; the ``moe-patch`` command prints
one as a single line (``--debug`` shows the traceback). docs/errors.md lists them for users.
"""

from __future__ import annotations


class MoEPatchError(Exception):
    """Base class of every error moe-patch raises on purpose (the CLI prints these without a traceback).

    ``cli_message``: the same message in the command line's words (``--quantize nf4`` where the library says
    ``quantize_experts='nf4'``), for an error whose way out names an argument; the message otherwise.
    """

    def __init__(self, *args: object, cli_message: str | None = None):
        super().__init__(*args)
        self._cli_message = cli_message

    @property
    def cli_message(self) -> str:
        return getattr(self, "_cli_message", None) or str(self)


class MoEConfigError(MoEPatchError, ValueError):
    """A model or checkpoint configuration is inconsistent (names the field and its value)."""


class InvalidArgumentError(MoEPatchError, ValueError):
    """An argument given to a moe-patch function or command is malformed or out of range (names the
    argument and the allowed values)."""


class NotAModelError(MoEPatchError, TypeError):
    """A function that works on a live model (``inspect_model``, ``patch_model``) got something else,
    e.g. a checkpoint path."""


class RoutingError(MoEPatchError, RuntimeError):
    """Router output that cannot be dispatched: non-finite weights or out-of-range expert indices."""


class ExpertOutputError(MoEPatchError, RuntimeError):
    """An expert's output turned non-finite (NaN or inf) from finite inputs: its weights hold non-finite values
    or overflow the compute dtype. Names the layer and the expert."""


class NoMoEFoundError(MoEPatchError):
    """The model has no Mixture-of-Experts block that moe-patch can recognise."""


class CheckpointError(MoEPatchError, OSError):
    """A checkpoint file or tensor is missing, unreadable, truncated or does not match its config."""


class OutputError(CheckpointError):
    """An output folder or file exists, cannot be created, or could not be written completely (disk full,
    read-only file system). Nothing partial is left under the output's name."""


class BudgetError(InvalidArgumentError):
    """A memory budget is malformed or too small for the model."""
