"""Compile the kernel library with the system C compiler, once per machine and source version.

Why a plain C library through ctypes and not ``torch.utils.cpp_extension``: the kernels need no torch
headers (they read raw tensor memory), so a build is four C files (~10 s on 2 cores) instead of a minute
or more of C++ against torch's headers, needs no ninja or g++, and ctypes releases the GIL during the call.
The objects are linked with ``-fopenmp`` against the ``libgomp.so.1`` soname: torch's CPU wheel bundles a
library of that soname and loads it first, so the kernels share torch's OpenMP runtime and thread pool
(two spinning pools on two cores slowed decoding by 40% in an earlier measurement).

The library goes to ``$MOE_PATCH_KERNEL_CACHE/<key>/`` (default ``$MOE_PATCH_CACHE/kernels``, i.e.
``~/.cache/moe_patch/kernels``), where the key hashes the sources, the compiler and its version, the flags,
the variants built and torch's version. It is built in a temporary folder and renamed into place
(moe_patch.atomic), so concurrent processes never load half a file.

Only the variants whose instruction sets the CPU lists are compiled (a variant takes ~5-9 s of compiler
time); the list only narrows the work, it never decides what runs: every compiled variant is probed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir
from .errors import KernelUnavailableError

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("mp_common.h", "mp_tables.c", "mp_kernels.c")
LIBRARY_NAME = "libmoe_kernels.so"

#: instruction-set variants, best first: (MP_DOT, compiler flags). Each is compiled from mp_kernels.c.
VARIANTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "avx512bf16": (1, ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c")),
    "avx512": (2, ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c")),
    "avx2": (3, ("-mavx2", "-mfma", "-mf16c")),
}
# -ffp-contract=off: no fused multiply-add where the source wrote a product and a sum (the decoders must round
# exactly like torch); the dot products use explicit FMA / dpbf16 instructions.
COMMON_FLAGS = ("-O2", "-fPIC", "-fopenmp", "-std=gnu11", "-fvisibility=hidden", "-ffp-contract=off", "-pthread")


@dataclass(frozen=True)
class Compiler:
    path: str
    version: str


#: the CPU flags (as /proc/cpuinfo spells them) each variant's instructions need
VARIANT_FLAGS = {
    "avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
}


def cache_root() -> Path:
    explicit = os.environ.get("MOE_PATCH_KERNEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("MOE_PATCH_CACHE") or "~/.cache/moe_patch").expanduser() / "kernels"


def variants_to_build() -> tuple[str, ...]:
    """The variants worth compiling here: those whose flags the CPU lists (all when it cannot be read)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return tuple(VARIANTS)
    line = next((ln for ln in info.splitlines() if ln.startswith("flags")), None)
    if line is None:
        return tuple(VARIANTS)
    flags = set(line.split(":", 1)[1].split())
    return tuple(v for v in VARIANTS if VARIANT_FLAGS[v] <= flags)


def find_compiler() -> Compiler:
    """The C compiler to build with: ``$CC``, else ``cc``, else ``gcc``."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return Compiler(path, (out.stdout.splitlines() or ["?"])[0].strip())
    raise KernelUnavailableError(f"no C compiler found ({' or '.join(candidates)} on PATH); install gcc or set CC")


def library_key(compiler: Compiler, variants: tuple[str, ...] = tuple(VARIANTS)) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(
        repr(
            (
                compiler.path,
                compiler.version,
                COMMON_FLAGS,
                {v: VARIANTS[v] for v in variants},
                torch.__version__,
                platform.machine(),
            )
        ).encode()
    )
    return h.hexdigest()[:20]


def _run(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _compile(compiler: Compiler, out_dir: Path, variants: tuple[str, ...]) -> Path:
    """Compile every object in parallel (one process per variant) and link the library in ``out_dir``."""
    jobs = [_run([compiler.path, *COMMON_FLAGS, "-c", str(CSRC / "mp_tables.c"), "-o", "mp_tables.o"], out_dir)]
    for name in variants:
        dot, flags = VARIANTS[name]
        jobs.append(
            _run(
                [
                    compiler.path,
                    *COMMON_FLAGS,
                    *flags,
                    f"-DMP_DOT={dot}",
                    f"-DMP_VARIANT={name}",
                    f"-I{CSRC}",
                    "-c",
                    str(CSRC / "mp_kernels.c"),
                    "-o",
                    f"mp_{name}.o",
                ],
                out_dir,
            )
        )
    failed = []
    for job in jobs:
        output, _ = job.communicate()
        if job.returncode != 0:
            failed.append(output.strip())
    if failed:
        first = next((ln for ln in failed[0].splitlines() if "error" in ln), failed[0].splitlines()[0])
        raise KernelUnavailableError(f"the C compiler {compiler.path} failed to build the kernels: {first}")
    objects = ["mp_tables.o", *(f"mp_{name}.o" for name in variants)]
    link = _run([compiler.path, "-shared", *COMMON_FLAGS, *objects, "-lm", "-o", LIBRARY_NAME], out_dir)
    output, _ = link.communicate()
    if link.returncode != 0:
        raise KernelUnavailableError(f"linking the kernels failed: {output.strip().splitlines()[0]}")
    return out_dir / LIBRARY_NAME


def build_library() -> tuple[Path, tuple[str, ...]]:
    """The compiled library's path and the variants in it: from the cache, or built now (raises
    :class:`KernelUnavailableError`)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailableError(f"the kernels are written for x86-64 CPUs; this is {platform.machine()}")
    variants = variants_to_build()
    if not variants:
        raise KernelUnavailableError("this CPU lists neither AVX-512 nor AVX2 with FMA and F16C")
    compiler = find_compiler()
    target = cache_root() / library_key(compiler, variants)
    lib = target / LIBRARY_NAME
    if lib.exists():
        return lib, variants
    logger.info(
        "building the CPU expert kernels (%s) with %s (%s) into %s",
        ", ".join(variants),
        compiler.path,
        compiler.version,
        target,
    )
    try:
        # built beside the target and renamed into place; a concurrent build of the same key replaces it whole
        with atomic_dir(target, replace=True) as tmp:
            _compile(compiler, tmp, variants)
            for leftover in tmp.glob("*.o"):
                leftover.unlink()
    except OSError as exc:
        raise KernelUnavailableError(f"cannot write the kernel library to {target}: {exc}") from None
    return lib, variants
