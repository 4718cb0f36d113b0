"""Which instruction-set variants of the kernel library run correctly on this CPU, found by running them.

Each variant's self-test (``mp_selftest_<variant>``: a small layer in several formats through the real
kernels, checked against a scalar reference) runs in a child process, so an instruction the CPU or its
hypervisor does not execute kills the child with SIGILL, not the caller. CPU flags and model names are
not consulted: a VM has been seen listing AMX and killing llama.cpp's AMX kernel with SIGILL. The answer is
kept next to the library, per CPU fingerprint, so later processes do not probe again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

from ..atomic import write_bytes

logger = logging.getLogger(__name__)

_CHILD = "import ctypes, sys; sys.exit(getattr(ctypes.CDLL(sys.argv[1]), 'mp_selftest_' + sys.argv[2])())"


@functools.cache
def cpu_fingerprint() -> str:
    """Identity of this CPU for the probe cache (model, flags, microcode): a different or upgraded CPU
    is probed again. Never used to decide what runs. Read once per process (per-call questions key on it)."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        keep = ("model name", "flags", "microcode", "vendor_id")
        text += "|" + "|".join(sorted({ln.strip() for ln in info.splitlines() if ln.split(":")[0].strip() in keep}))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _outcome(returncode: int) -> str:
    if returncode == 0:
        return "ok"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"self-test check {returncode} failed"


def run_probes(library: Path, variants: list[str]) -> dict[str, str]:
    """Variant -> ``"ok"`` or why not, each from a child process running its self-test."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    procs = {
        v: subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(library), v],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for v in variants
    }
    results = {}
    for v, proc in procs.items():
        try:
            results[v] = _outcome(proc.wait(timeout=120))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            results[v] = "self-test timed out"
    return results


def probe(library: Path, variants: list[str]) -> dict[str, str]:
    """The probe results for ``library`` on this CPU: cached beside the library, or measured now."""
    cache = library.parent / f"probe-{cpu_fingerprint()}.json"
    try:
        known = json.loads(cache.read_text())
        if isinstance(known, dict) and set(known) == set(variants):
            return known
    except (OSError, ValueError):
        pass
    results = run_probes(library, variants)
    logger.info("kernel variants on this CPU: %s", ", ".join(f"{v}: {r}" for v, r in results.items()))
    try:
        write_bytes(cache, json.dumps(results, indent=1).encode())
    except OSError as exc:  # a read-only cache only means probing again next time
        logger.debug("could not keep the probe result in %s: %s", cache, exc)
    return results
