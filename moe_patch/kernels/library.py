"""Loading the compiled kernel library and choosing the instruction-set variant to run.

:data:`KERNELS` is the explicit registry of this process's kernel state (the library handle and the probe
result), created lazily on first use: nothing is compiled or probed when moe_patch is imported.

Environment:
    ``MOE_PATCH_KERNELS``: ``0``/``off`` turns the kernels off (callers keep their torch path; CI runs the
    tests both ways); ``1``/``on``/``auto`` or unset: use them where they work.
    ``MOE_PATCH_KERNELS_ISA``: ``avx512bf16``, ``avx512`` or ``avx2`` caps the variant used (for testing each
    variant this CPU runs, or to compare them); a variant the probe did not pass is refused.
    ``MOE_PATCH_KERNEL_CACHE``: where compiled libraries are kept (default ``$MOE_PATCH_CACHE/kernels``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp.so.1 before the kernels, so they share its OpenMP runtime)

from .build import VARIANTS, build_library
from .errors import KernelUnavailableError
from .probe import probe

logger = logging.getLogger(__name__)

ABI_VERSION = 3

# enum values of csrc/mp_common.h
W_FORMATS = {"bf16": 1, "fp16": 2, "fp32": 3, "fp8": 4, "mxfp4": 5, "int4": 6, "int8": 7}
DT_NONE, DT_F32, DT_BF16, DT_F16, DT_E8M0 = -1, 0, 1, 2, 3
ACTIVATIONS = {"silu": 1, "gpt_oss": 2, "gelu_tanh": 3}
GLU_LAYOUTS = {"halves": 0, "interleaved": 1}
MODE_FUSED, MODE_GATE_UP, MODE_DOWN = 0, 1, 2
# columns of the expert table: gu_w, gu_s, gu_z, gu_b, dn_w, dn_s, dn_z, dn_b, then up_w, up_s, up_z (the second
# part of a gate_up projection stored as two tensors)
PTRS = 11
ERRORS = {-1: "workspace too small", -2: "invalid argument"}
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


class MpProj(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_int32)
        for n in (
            "fmt",
            "rows",
            "cols",
            "sdtype",
            "b0",
            "b1_shift",
            "scols",
            "bits",
            "has_zp",
            "bias_dtype",
            "split",
            "pad_",
        )
    ] + [("wrow_bytes", ctypes.c_int64)]


class MpLayer(ctypes.Structure):
    _fields_ = (
        [("gu", MpProj), ("dn", MpProj)]
        + [(n, ctypes.c_int32) for n in ("num_experts", "hidden", "inter", "glu", "act", "pad_")]
        + [("alpha", ctypes.c_float), ("limit", ctypes.c_float), ("table", ctypes.c_void_p)]
    )


class MpCall(ctypes.Structure):
    _fields_ = (
        [(n, ctypes.c_void_p) for n in ("x", "idx", "wts", "out", "ws")]
        + [(n, ctypes.c_int64) for n in ("x_stride", "out_stride", "ws_bytes")]
        + [
            (n, ctypes.c_int32)
            for n in (
                "x_dtype",
                "w_dtype",
                "out_dtype",
                "T",
                "k",
                "mode",
                "accumulate",
                "weight_inputs",
                "nthreads",
                "round_bf16",
            )
        ]
    )


class MpAttn(ctypes.Structure):
    _fields_ = (
        [(n, ctypes.c_void_p) for n in ("q", "k", "v", "mask", "sinks", "out", "ws")]
        + [(n, ctypes.c_int64 * 3) for n in ("qs", "ks", "vs", "ms", "os")]
        + [("ws_bytes", ctypes.c_int64)]
        + [
            (n, ctypes.c_int32)
            for n in (
                "B",
                "Hq",
                "Hkv",
                "Tq",
                "S",
                "D",
                "q_dtype",
                "kv_dtype",
                "mask_kind",
                "mask_dtype",
                "sinks_dtype",
                "out_dtype",
                "causal",
                "nthreads",
            )
        ]
        + [("scale", ctypes.c_float), ("pad_", ctypes.c_float)]
    )


@dataclass(frozen=True)
class Variant:
    """One instruction-set variant's entry points."""

    name: str
    bf16_dot: bool  # computes bf16 x bf16 products natively (vdpbf16ps); else fp32 FMA
    run: ctypes._CFuncPtr
    workspace: ctypes._CFuncPtr
    decode: ctypes._CFuncPtr
    attend: ctypes._CFuncPtr
    attend_workspace: ctypes._CFuncPtr


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernels run here. ``variants``: the ones the probe passed, best first (after the
    ``MOE_PATCH_KERNELS_ISA`` cap); ``probe``: each variant's probe outcome; ``reason``: why not, if not."""

    available: bool
    reason: str = ""
    variants: tuple[str, ...] = ()
    probe: dict | None = None
    library: str | None = None


def _bind(lib: ctypes.CDLL, name: str) -> Variant:
    run = getattr(lib, f"mp_run_{name}")
    run.argtypes, run.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    ws = getattr(lib, f"mp_workspace_{name}")
    ws.argtypes, ws.restype = [ctypes.c_void_p] + [ctypes.c_int] * 5, ctypes.c_int64
    dec = getattr(lib, f"mp_decode_{name}")
    dec.argtypes, dec.restype = (
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int],
        ctypes.c_int,
    )
    attend = getattr(lib, f"mp_attend_{name}")
    attend.argtypes, attend.restype = [ctypes.c_void_p], ctypes.c_int
    attend_ws = getattr(lib, f"mp_attend_workspace_{name}")
    attend_ws.argtypes, attend_ws.restype = [ctypes.c_void_p], ctypes.c_int64
    return Variant(name, VARIANTS[name][0] == 1, run, ws, dec, attend, attend_ws)


class KernelRegistry:
    """The process's kernel library and probe result (built, loaded and probed once, on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: KernelStatus | None = None
        self._variants: dict[str, Variant] = {}

    def status(self) -> KernelStatus:
        if self._status is None:
            with self._lock:
                if self._status is None:
                    self._status = self._load()
        return self._status

    def reset(self) -> None:
        """Forget the loaded state (the environment is read again on next use; the library stays mapped)."""
        with self._lock:
            self._status = None
            self._variants = {}

    def variant(self, name: str) -> Variant:
        return self._variants[name]

    def _load(self) -> KernelStatus:
        setting = os.environ.get("MOE_PATCH_KERNELS", "auto").strip().lower()
        if setting in ("0", "off", "false", "no"):
            logger.info("CPU expert kernels off (MOE_PATCH_KERNELS=%s): experts are computed with torch", setting)
            return KernelStatus(False, f"turned off by MOE_PATCH_KERNELS={setting}")
        if setting not in ("1", "on", "true", "yes", "auto", ""):
            return self._unavailable(f"MOE_PATCH_KERNELS={setting!r} is not one of 0, 1, auto")
        cap = os.environ.get("MOE_PATCH_KERNELS_ISA", "").strip().lower()
        if cap and cap not in VARIANTS:
            return self._unavailable(f"MOE_PATCH_KERNELS_ISA={cap!r} is not one of {', '.join(VARIANTS)}")
        try:
            path, built = build_library()
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        except KernelUnavailableError as exc:
            return self._unavailable(str(exc))
        except OSError as exc:
            return self._unavailable(f"cannot load {path}: {exc}")
        if (
            lib.mp_abi_version() != ABI_VERSION
            or lib.mp_sizeof_layer() != ctypes.sizeof(MpLayer)
            or lib.mp_sizeof_call() != ctypes.sizeof(MpCall)
            or lib.mp_sizeof_attn() != ctypes.sizeof(MpAttn)
        ):
            return self._unavailable(f"{path} does not match this moe_patch version (ABI); delete it to rebuild")
        results = probe(path, list(built))
        passed = [v for v in built if results.get(v) == "ok"]
        if cap:
            order = list(VARIANTS)
            if results.get(cap) != "ok":
                why = results.get(cap) or "its instruction sets are not listed by this CPU"
                return self._unavailable(
                    f"MOE_PATCH_KERNELS_ISA={cap}: that variant does not run here ({why})", results, path
                )
            passed = [v for v in passed if order.index(v) >= order.index(cap)]
        if not passed:
            return self._unavailable(
                "no instruction-set variant runs on this CPU (AVX2+FMA+F16C at least): "
                + ", ".join(f"{v} {r}" for v, r in results.items()),
                results,
                path,
            )
        self._variants = {v: _bind(lib, v) for v in passed}
        logger.info("CPU expert kernels: %s (%s)", ", ".join(passed), path)
        return KernelStatus(True, "", tuple(passed), results, str(path))

    @staticmethod
    def _unavailable(reason: str, results: dict | None = None, path: Path | None = None) -> KernelStatus:
        logger.warning("CPU expert kernels not available: %s; experts are computed with torch", reason)
        return KernelStatus(False, reason, (), results, str(path) if path else None)


#: the process's kernel state
KERNELS = KernelRegistry()


def status() -> KernelStatus:
    """Whether the kernels run on this machine, which variants, and why not (builds and probes on first call)."""
    return KERNELS.status()


def available() -> bool:
    """True when the native kernels can be used (see :func:`status` for why not)."""
    return KERNELS.status().available
