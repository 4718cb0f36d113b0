"""Shared fixtures of the kernel tests: the library status (built once per session) and a seeded generator.

The compiled library is kept in the user's kernel cache (``~/.cache/moe_patch/kernels``) rather than the
per-run folder the root conftest gives calibrations: it is keyed by the sources, compiler and flags, so a
stale one is never loaded, and later runs skip the compile (~10-25 s on 2 cores)."""

from __future__ import annotations

import os
import platform
import shutil

import pytest
import torch

from moe_patch import kernels

os.environ.setdefault("MOE_PATCH_KERNEL_CACHE", os.path.expanduser("~/.cache/moe_patch/kernels"))


def kernels_expected() -> bool:
    """Whether this machine should run the kernels: x86-64, a C compiler, and not turned off."""
    off = os.environ.get("MOE_PATCH_KERNELS", "").strip().lower() in ("0", "off", "false", "no")
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    return not off and platform.machine().lower() in ("x86_64", "amd64") and compiler is not None


@pytest.fixture(scope="session")
def kernel_status():
    """The kernels' status; tests that need them skip where they cannot run (and fail where they should)."""
    st = kernels.status()
    if not st.available:
        if kernels_expected():
            pytest.fail(f"the kernels should run on this machine but do not: {st.reason}")
        pytest.skip(f"CPU expert kernels not available here: {st.reason}")
    return st


@pytest.fixture(scope="session")
def variants(kernel_status) -> tuple[str, ...]:
    return kernel_status.variants


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
