"""OpenMP teams of the threads moe-patch runs torch work on.

libgomp, the OpenMP runtime of torch's CPU wheels (and of the CPU kernels, linked against the same soname), gives
every thread that starts a parallel region a team of worker threads of its own, kept alive afterwards. Once the
process holds more OpenMP threads than CPUs, libgomp stops letting idle workers spin ("throttled": 100 spins
instead of 300,000), so every parallel region, torch's ops and the kernels' alike, starts by waking its workers
through the OS. Measured on the 2-core VM (docs/benchmarks.md): a 2.9 MB bf16 GEMV took 107 us, and 154-205 us
once two live background threads had each run one parallel tensor copy; a decode step of the gpt-oss-20b-shaped
MXFP4 engine took 38.3 ms against 32.4 once its reader threads stopped making teams (alternating processes).

So the threads moe-patch starts keep to one team per process:

- background threads that only move or copy tensors (expert reads, slot fills) run their torch ops without a
  team (:func:`serial_worker`, a ``ThreadPoolExecutor`` initializer);
- a thread that hands the model's compute to another thread (``generate`` under a streamer, the server's engine)
  first lets its own idle team go (:func:`release_idle_team`).

Where torch runs on another OpenMP runtime, or none, both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os

#: sonames of the OpenMP runtimes torch builds ship, tried only if already loaded (``RTLD_NOLOAD``)
_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.dylib")
#: ``omp_pause_soft`` of OpenMP 5.0: the runtime frees the calling thread's idle workers, state may be rebuilt
_OMP_PAUSE_SOFT = 1


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded into this process, or None."""
    import torch  # noqa: F401 - loads torch's runtime first, so the lookup below cannot miss it

    noload = getattr(os, "RTLD_NOLOAD", 0)
    if not noload:  # (Windows) nothing to look up without loading something new
        return None
    for name in _RUNTIMES:
        try:
            lib = ctypes.CDLL(name, mode=noload | os.RTLD_LAZY)
        except OSError:
            continue
        if hasattr(lib, "omp_set_num_threads"):
            if hasattr(lib, "omp_pause_resource_all"):
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return lib
    return None


def serial_worker() -> None:
    """Make the calling thread run its torch ops without an OpenMP team of its own (this thread only).

    For ``ThreadPoolExecutor(initializer=serial_worker)`` threads that read and copy expert weights: their copies
    are bandwidth-bound and run beside the compute, which keeps the CPUs. torch's per-thread lazy setup, which
    would set the thread's team size back to the process default, runs first.
    """
    import torch

    torch.get_num_threads()  # torch's per-thread setup first: it would reset the size set below
    lib = _openmp()
    if lib is not None:
        lib.omp_set_num_threads(1)


def release_idle_team() -> bool:
    """Let the calling thread's idle OpenMP workers exit, before another thread takes over the compute.

    The calling thread gets a new team if it starts a parallel region again. Returns whether the runtime did it
    (False without a known runtime, or inside a parallel region).
    """
    lib = _openmp()
    pause = getattr(lib, "omp_pause_resource_all", None) if lib is not None else None
    if pause is None:
        return False
    return pause(_OMP_PAUSE_SOFT) == 0
