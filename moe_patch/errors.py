"""Errors raised by moe-patch. Each message says what went wrong and what to do."""

from __future__ import annotations


class MoEPatchError(Exception):
    """Base class of every error moe-patch raises on purpose (the CLI prints these without a traceback)."""


class MoEConfigError(MoEPatchError, ValueError):
    """A model or checkpoint configuration is inconsistent (names the field and its value)."""


class RoutingError(MoEPatchError, RuntimeError):
    """Router output that cannot be dispatched: non-finite weights or out-of-range expert indices."""


class NoMoEFoundError(MoEPatchError):
    """The model has no Mixture-of-Experts block that moe-patch can recognise."""


class CheckpointError(MoEPatchError, OSError):
    """A checkpoint file or tensor is missing, truncated or does not match its config."""


class BudgetError(MoEPatchError, ValueError):
    """A memory budget is malformed or too small for the model."""
