"""The one error the kernel library raises on purpose."""

from __future__ import annotations

from ..errors import MoEPatchError


class KernelUnavailableError(MoEPatchError, RuntimeError):
    """The native CPU expert kernels cannot run here, or not for this layer (no C compiler, no supported
    instruction set, turned off with ``MOE_PATCH_KERNELS=0``, or a storage layout the kernels do not cover).
    The message says which; callers keep their torch path."""
