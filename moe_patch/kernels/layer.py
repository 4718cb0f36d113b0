"""One MoE layer's routed experts computed by the native kernels, one call per layer.

A :class:`MoEKernel` is built once per layer from its :class:`~.spec.MoELayerSpec`; experts are attached
with :meth:`MoEKernel.set_expert` (their stored tensors are checked once, there, and referenced, not copied:
a cache slot can be re-pointed at any time between calls). Per call:

- :meth:`MoEKernel.forward`: gate_up, activation, down and the weighted sum over top-k, for all tokens;
- :meth:`MoEKernel.gate_up` then :meth:`MoEKernel.down`: the two halves, for families with their own gate
  (``_apply_gate``): any activation runs in torch between them;
- :meth:`MoEKernel.decode`: one expert's projection as a dense matrix (for a torch GEMM at large row counts).

Slots whose expert id is outside ``[0, E)`` or whose expert is not attached are skipped (the caller computes
them elsewhere, e.g. on a GPU). The compute precision follows ``x``: bf16 activations are computed with bf16
weights (decoded exactly as the torch decoders do in bf16) and fp32 accumulation; fp32 and fp16 activations
in fp32. Details and error bounds: moe_patch/kernels/README.md.
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .crossover import CROSSOVERS, ROW_BUCKETS
from .errors import KernelUnavailableError
from .library import (
    ACTIVATIONS,
    DT_BF16,
    DT_F32,
    ERRORS,
    GLU_LAYOUTS,
    KERNELS,
    MODE_DOWN,
    MODE_FUSED,
    MODE_GATE_UP,
    PTRS,
    MpCall,
    MpLayer,
    Variant,
)
from .spec import FLOAT_DTYPES, ExpertWeights, MoELayerSpec, projection_pointers

COMPUTE = ("auto", "bf16", "fp32")
#: tokens per kernel call: longer inputs are computed in chunks (bounds the workspace; at this length every
#: expert already has enough rows to reuse each decoded weight many times)
MAX_TOKENS = 4096


def torch_activation(spec: MoELayerSpec, h: torch.Tensor) -> torch.Tensor:
    """The kernels' activation in torch (the GEMM path): ``h`` [rows, 2I] in stored row order -> [rows, I]."""
    if spec.glu_layout == "interleaved":
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if spec.activation == "gpt_oss":
        gate, up = gate.clamp(max=spec.limit), up.clamp(-spec.limit, spec.limit)
        return (up + 1) * gate * torch.sigmoid(gate * spec.alpha)
    if spec.activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


class Workspace:
    """Scratch memory of kernel calls: grown when a call needs more, then reused (no allocation per call)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self.call = MpCall()
        self.call_ref = ctypes.byref(self.call)

    def ensure(self, nbytes: int) -> tuple[int, int]:
        """Address and size of at least ``nbytes`` bytes."""
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None  # free the old one first
            self._buf = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8, device="cpu")
        return self._buf.data_ptr(), self._buf.numel()

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def release(self) -> None:
        self._buf = None


class _ThreadWorkspaces(threading.local):
    """One default :class:`Workspace` per thread (calls from several threads never share scratch)."""

    def get(self) -> Workspace:
        ws = getattr(self, "ws", None)
        if ws is None:
            ws = self.ws = Workspace()
        return ws


#: the default workspaces (explicit registry; ``WORKSPACES.get().release()`` frees this thread's)
WORKSPACES = _ThreadWorkspaces()


def pick_variants(usable: tuple[str, ...], isa: str | None) -> tuple[Variant, Variant | None]:
    """(the variant for bf16-compute calls, the one for fp32-compute calls or None): the best of ``usable`` (the
    probe's, best first) no better than ``isa``, and the best of those without a bf16 dot product."""
    allowed = list(usable)
    if isa is not None:
        if isa not in allowed:
            raise KernelUnavailableError(
                f"instruction-set variant {isa!r} does not run here (usable: {', '.join(allowed)})"
            )
        allowed = allowed[allowed.index(isa) :]
    fp32 = [v for v in allowed if not KERNELS.variant(v).bf16_dot]
    return KERNELS.variant(allowed[0]), KERNELS.variant(fp32[0]) if fp32 else None


def invoke(
    variant: Variant,
    bf16: bool,
    layer_ref,
    sizes: dict[tuple, int],
    mode: int,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    out: torch.Tensor,
    tokens: int,
    k: int,
    accumulate: bool,
    weight_inputs: bool,
    workspace: Workspace | None,
) -> None:
    """One native call over ``tokens`` tokens (at most :data:`MAX_TOKENS`): the workspace sized from ``sizes``
    (bytes per call shape, filled here; the layout depends on nothing else), the call's fields set, errors raised."""
    threads = torch.get_num_threads()
    ws = workspace or WORKSPACES.get()
    key = (variant.name, tokens, k, mode, weight_inputs, threads)
    need = sizes.get(key)
    if need is None:
        need = sizes[key] = variant.workspace(layer_ref, tokens, k, mode, int(weight_inputs), threads)
        if len(sizes) > 256:  # many distinct prefill lengths: forget, do not grow
            sizes.clear()
    ptr, size = ws.ensure(need)
    c = ws.call
    c.x, c.idx, c.out, c.ws = x.data_ptr(), top_k_index.data_ptr(), out.data_ptr(), ptr
    c.wts = top_k_weights.data_ptr() if top_k_weights is not None else None
    c.x_stride, c.out_stride, c.ws_bytes = x.stride(0), out.stride(0), size
    c.x_dtype, c.out_dtype = FLOAT_DTYPES[x.dtype], FLOAT_DTYPES[out.dtype]
    c.w_dtype = FLOAT_DTYPES[top_k_weights.dtype] if top_k_weights is not None else DT_F32
    c.T, c.k, c.mode, c.accumulate, c.weight_inputs = tokens, k, mode, int(accumulate), int(weight_inputs)
    c.nthreads, c.round_bf16 = threads, int(bf16)
    rc = variant.run(layer_ref, ws.call_ref)
    if rc:
        raise RuntimeError(f"internal error: kernel {variant.name} returned {rc} ({ERRORS.get(rc, '?')})")


def check_2d(t: torch.Tensor, name: str, dtypes, rows: int | None, cols: int | None) -> None:
    """A 2-D CPU tensor of ``dtypes``, ``[rows, cols]`` (None: any), rows contiguous (the per-call check: cheap)."""
    if not isinstance(t, torch.Tensor) or not t.is_cpu or t.dim() != 2 or t.dtype not in dtypes:
        raise InvalidArgumentError(
            f"{name} must be a 2-D CPU tensor of {' or '.join(map(str, dtypes))}, got "
            f"{getattr(t, 'shape', None)} {getattr(t, 'dtype', type(t).__name__)}"
            f" on {getattr(t, 'device', '?')}."
        )
    r, c = t.shape
    if (rows is not None and r != rows) or (cols is not None and c != cols):
        raise InvalidArgumentError(f"{name} has shape {tuple(t.shape)}, expected ({rows}, {cols}).")
    sr, sc = t.stride()
    if c > 1 and sc != 1:
        raise InvalidArgumentError(f"{name} must have contiguous rows (stride 1 along its last dimension).")
    if r > 1 and sr < c:
        raise InvalidArgumentError(f"{name} has overlapping rows (stride {sr}).")


class MoEKernel:
    """The routed experts of one MoE layer, computed from their stored bytes by the native CPU kernels.

    Raises :class:`KernelUnavailableError` (with the reason) when the kernels do not run on this machine or
    cannot compute ``spec``; callers then keep their torch path. Calls may run from several threads at once
    (each thread has its own default workspace); :meth:`set_expert` must not race a call routed to that expert.

    Args:
        spec: the layer's shape, formats and activation.
        compute: ``auto`` (bf16 for bf16 activations, fp32 otherwise), ``bf16`` or ``fp32``.
        isa: the best instruction-set variant allowed (``avx512bf16``, ``avx512``, ``avx2``); default: the
            best one the probe passed. For tests and comparisons.
        gemm_min_rows: experts with at least this many rows in a :meth:`forward` call are decoded densely and
            computed with torch's GEMM instead (prefill); ``"auto"``: the crossover measured on this machine
            (:mod:`.crossover`); ``None``: never.
    """

    def __init__(
        self,
        spec: MoELayerSpec,
        *,
        compute: str = "auto",
        isa: str | None = None,
        gemm_min_rows: float | str | None = "auto",
    ):
        if compute not in COMPUTE:
            raise InvalidArgumentError(f"compute must be one of {', '.join(COMPUTE)}, got {compute!r}.")
        if (
            gemm_min_rows != "auto"
            and gemm_min_rows is not None
            and not (isinstance(gemm_min_rows, (int, float)) and gemm_min_rows >= 1)
        ):
            raise InvalidArgumentError(f"gemm_min_rows must be 'auto', None or a number >= 1, got {gemm_min_rows!r}.")
        self.gemm_min_rows = gemm_min_rows
        status = KERNELS.status()
        if not status.available:
            raise KernelUnavailableError(status.reason)
        reason = spec.unsupported()
        if reason:
            raise KernelUnavailableError(reason)
        self.spec = spec
        self.compute = compute
        self._bf16, self._fp32 = pick_variants(status.variants, isa)
        self._table = torch.zeros(spec.num_experts, PTRS, dtype=torch.int64, device="cpu")
        # what the table points into, held here (a caller re-assigning its ExpertWeights cannot free it)
        self._keep: list[list[torch.Tensor] | None] = [None] * spec.num_experts
        self._biases: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * spec.num_experts
        layer = MpLayer()
        layer.gu = spec.gate_up.proj(*spec.gate_up_shape)
        layer.dn = spec.down.proj(*spec.down_shape)
        layer.num_experts, layer.hidden, layer.inter = spec.num_experts, spec.hidden, spec.intermediate
        layer.glu, layer.act = GLU_LAYOUTS[spec.glu_layout], ACTIVATIONS[spec.activation]
        layer.alpha, layer.limit = spec.alpha, spec.limit
        layer.table = self._table.data_ptr()
        self._layer = layer
        self._layer_ref = ctypes.byref(layer)
        #: name of the variant that ran the last call (tests assert the compiled path ran)
        self.last_variant: str | None = None
        self._ws_bytes: dict[tuple, int] = {}  # workspace bytes per call shape (the layout depends on nothing else)

    @property
    def variants(self) -> tuple[str, str | None]:
        """(variant of bf16-compute calls, variant of fp32-compute calls)."""
        return self._bf16.name, self._fp32.name if self._fp32 else None

    # ------------------------------------------------------------------ experts
    def set_expert(self, expert: int, weights: ExpertWeights | None) -> None:
        """Attach ``expert``'s stored tensors (checked against the spec; referenced, not copied), or detach it
        with ``None`` (its slots are then skipped)."""
        if not 0 <= expert < self.spec.num_experts:
            raise InvalidArgumentError(f"expert {expert} is outside [0, {self.spec.num_experts}).")
        if weights is None:
            self._table[expert].zero_()
            self._keep[expert], self._biases[expert] = None, (None, None)
            return
        s = self.spec
        gu, up, keep_gu = projection_pointers(
            s.gate_up,
            *s.gate_up_shape,
            f"expert {expert} gate_up",
            weights.gate_up,
            weights.gate_up_scale,
            weights.gate_up_zero_point,
            weights.gate_up_bias,
        )
        dn, _, keep_dn = projection_pointers(
            s.down,
            *s.down_shape,
            f"expert {expert} down",
            weights.down,
            weights.down_scale,
            weights.down_zero_point,
            weights.down_bias,
        )
        self._keep[expert] = keep_gu + keep_dn
        self._biases[expert] = (weights.gate_up_bias, weights.down_bias)
        self._table[expert] = torch.tensor(gu + dn + up, dtype=torch.int64, device="cpu")

    def has_expert(self, expert: int) -> bool:
        return self._keep[expert] is not None

    # ------------------------------------------------------------------ calls
    def _variant(self, dtype: torch.dtype) -> tuple[Variant, bool]:
        bf16 = self.compute == "bf16" or (self.compute == "auto" and dtype == torch.bfloat16)
        if bf16:
            return self._bf16, True
        if self._fp32 is None:
            raise KernelUnavailableError(f"no fp32 variant allowed with isa={self._bf16.name}")
        return self._fp32, False

    def _routing(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor | None, tokens: int) -> int:
        if (
            not isinstance(top_k_index, torch.Tensor)
            or top_k_index.dtype != torch.int64
            or not top_k_index.is_cpu
            or top_k_index.dim() != 2
            or top_k_index.shape[0] != tokens
            or not top_k_index.is_contiguous()
        ):
            raise InvalidArgumentError(
                f"top_k_index must be a contiguous int64 CPU tensor [{tokens}, k], got "
                f"{getattr(top_k_index, 'shape', None)} {getattr(top_k_index, 'dtype', None)}."
            )
        k = top_k_index.shape[1]
        if k < 1:
            raise InvalidArgumentError("top_k_index has no columns.")
        if top_k_weights is not None and (
            not isinstance(top_k_weights, torch.Tensor)
            or top_k_weights.dtype not in FLOAT_DTYPES
            or not top_k_weights.is_cpu
            or top_k_weights.shape != top_k_index.shape
            or not top_k_weights.is_contiguous()
        ):
            raise InvalidArgumentError(
                f"top_k_weights must be a contiguous float CPU tensor [{tokens}, {k}], got "
                f"{getattr(top_k_weights, 'shape', None)} "
                f"{getattr(top_k_weights, 'dtype', None)}."
            )
        return k

    def _run(
        self,
        mode: int,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor | None,
        out: torch.Tensor,
        tokens: int,
        k: int,
        accumulate: bool,
        weight_inputs: bool,
        workspace: Workspace | None,
        layer_ref=None,
    ) -> None:
        layer_ref = layer_ref or self._layer_ref
        if tokens > MAX_TOKENS:
            for t0 in range(0, tokens, MAX_TOKENS):
                t1 = min(tokens, t0 + MAX_TOKENS)
                xs = x[t0 * k : t1 * k] if mode == MODE_DOWN else x[t0:t1]
                os_ = out[t0 * k : t1 * k] if mode == MODE_GATE_UP else out[t0:t1]
                wts = top_k_weights[t0:t1] if top_k_weights is not None else None
                self._run(
                    mode, xs, top_k_index[t0:t1], wts, os_, t1 - t0, k, accumulate, weight_inputs, workspace, layer_ref
                )
            return
        variant, bf16 = self._variant(x.dtype)
        invoke(
            variant,
            bf16,
            layer_ref,
            self._ws_bytes,
            mode,
            x,
            top_k_index,
            top_k_weights,
            out,
            tokens,
            k,
            accumulate,
            weight_inputs,
            workspace,
        )
        self.last_variant = variant.name

    def forward(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        accumulate: bool = False,
        weight_inputs: bool = False,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """``out[t] (+)= sum_j w[t, j] * down(act(gate_up(x[t])))`` over the routed, attached experts.

        Args:
            x: ``[T, hidden]`` float32, bfloat16 or float16 (rows contiguous).
            top_k_index: ``[T, k]`` int64 expert ids (outside ``[0, E)``: skipped).
            top_k_weights: ``[T, k]`` routing weights.
            out: ``[T, hidden]`` result (float32/bfloat16/float16); a new tensor of x's dtype when None.
            accumulate: add into ``out`` instead of overwriting it (the sum is formed in fp32 and added once).
            weight_inputs: scale each expert's input by its routing weight instead of its output (Llama 4).
        """
        s = self.spec
        check_2d(x, "x", FLOAT_DTYPES, None, s.hidden)
        tokens = x.shape[0]
        k = self._routing(top_k_index, top_k_weights, tokens)
        if top_k_weights is None:
            raise InvalidArgumentError("forward needs top_k_weights.")
        if out is None:
            out, accumulate = torch.empty(tokens, s.hidden, dtype=x.dtype, device="cpu"), False
        check_2d(out, "out", FLOAT_DTYPES, tokens, s.hidden)
        if not tokens:
            return out
        # an expert has at most one row per token: below the smallest bucket no call asks the crossover
        big = self._gemm_experts(x.dtype, top_k_index) if tokens >= ROW_BUCKETS[0] else []
        if not big:
            self._run(MODE_FUSED, x, top_k_index, top_k_weights, out, tokens, k, accumulate, weight_inputs, workspace)
            return out
        # experts with many rows: dense decode + torch GEMM; the rest through the kernel (a table without them)
        table = self._table.clone()
        table[big] = 0
        layer = MpLayer.from_buffer_copy(self._layer)
        layer.table = table.data_ptr()
        self._run(
            MODE_FUSED,
            x,
            top_k_index,
            top_k_weights,
            out,
            tokens,
            k,
            accumulate,
            weight_inputs,
            workspace,
            ctypes.byref(layer),
        )
        out.add_(self._gemm_part(big, x, top_k_index, top_k_weights, weight_inputs))
        return out

    def _gemm_experts(self, dtype: torch.dtype, top_k_index: torch.Tensor) -> list[int]:
        """The attached experts with at least the crossover's rows in this call."""
        if self.gemm_min_rows is None:
            return []
        _, bf16 = self._variant(dtype)
        compute = torch.bfloat16 if bf16 else torch.float32
        threshold = (
            CROSSOVERS.get(self.spec.gate_up.kind, compute)
            if self.gemm_min_rows == "auto"
            else float(self.gemm_min_rows)
        )
        if math.isinf(threshold) or top_k_index.numel() < threshold:
            return []
        flat = top_k_index.reshape(-1)
        counts = torch.bincount(flat[(flat >= 0) & (flat < self.spec.num_experts)], minlength=self.spec.num_experts)
        return [e for e in (counts >= threshold).nonzero().flatten().tolist() if self._keep[e] is not None]

    def _gemm_part(
        self,
        experts: list[int],
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        weight_inputs: bool,
    ) -> torch.Tensor:
        """fp32 [T, hidden]: ``experts`` decoded to the compute dtype (the torch decoders' values) and computed
        with torch's GEMM, activation in fp32 as in the kernel."""
        _, bf16 = self._variant(x.dtype)
        compute = torch.bfloat16 if bf16 else torch.float32
        s, k = self.spec, top_k_index.shape[1]
        acc = torch.zeros(x.shape[0], s.hidden, dtype=torch.float32, device="cpu")
        flat = top_k_index.reshape(-1)
        for e in experts:
            slots = (flat == e).nonzero().flatten()
            tok, w = slots // k, top_k_weights.reshape(-1)[slots].float()
            xin = (x[tok].float() * w[:, None] if weight_inputs else x[tok]).to(compute)
            gate_up_bias, down_bias = self._biases[e]
            h = F.linear(xin, self.decode(e, "gate_up", compute)).float()
            if gate_up_bias is not None:
                h += gate_up_bias.float()
            a = torch_activation(s, h).to(compute)
            y = F.linear(a, self.decode(e, "down", compute)).float()
            if down_bias is not None:
                y += down_bias.float()
            acc.index_add_(0, tok, y if weight_inputs else y * w[:, None])
        return acc

    def gate_up(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        top_k_weights: torch.Tensor | None = None,
        weight_inputs: bool = False,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """The gate_up projection (bias included, no activation) of every routed slot: fp32 ``[T * k, 2I]``,
        row ``t * k + j`` for slot ``(t, j)``, columns in stored row order (interleaved for gpt-oss). Rows of
        skipped slots are left as they were (zeros in a new tensor)."""
        s = self.spec
        check_2d(x, "x", FLOAT_DTYPES, None, s.hidden)
        tokens = x.shape[0]
        k = self._routing(top_k_index, top_k_weights, tokens)
        if weight_inputs and top_k_weights is None:
            raise InvalidArgumentError("weight_inputs needs top_k_weights.")
        if out is None:
            out = torch.zeros(tokens * k, 2 * s.intermediate, dtype=torch.float32, device="cpu")
        check_2d(out, "out", (torch.float32,), tokens * k, 2 * s.intermediate)
        if tokens:
            self._run(MODE_GATE_UP, x, top_k_index, top_k_weights, out, tokens, k, False, weight_inputs, workspace)
        return out

    def down(
        self,
        a: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        out: torch.Tensor,
        *,
        accumulate: bool = False,
        weight_inputs: bool = False,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """``out[t] (+)= sum_j w[t, j] * down(a[t * k + j])`` (weights not applied with ``weight_inputs``): the
        second half after an activation computed elsewhere. ``a``'s dtype sets the compute precision."""
        s = self.spec
        check_2d(out, "out", FLOAT_DTYPES, None, s.hidden)
        tokens = out.shape[0]
        k = self._routing(top_k_index, top_k_weights, tokens)
        if top_k_weights is None and not weight_inputs:
            raise InvalidArgumentError("down needs top_k_weights (or weight_inputs=True).")
        check_2d(a, "a", FLOAT_DTYPES, tokens * k, s.intermediate)
        if tokens:
            self._run(MODE_DOWN, a, top_k_index, top_k_weights, out, tokens, k, accumulate, weight_inputs, workspace)
        return out

    def decode(
        self,
        expert: int,
        projection: str = "gate_up",
        dtype: torch.dtype = torch.bfloat16,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert ``expert``'s ``gate_up`` or ``down`` weight as a dense ``[rows, cols]`` tensor of ``dtype``
        (bfloat16 or float32): the values the kernels compute with, equal to the torch decoders' in ``dtype``."""
        if projection not in ("gate_up", "down"):
            raise InvalidArgumentError(f"projection must be 'gate_up' or 'down', got {projection!r}.")
        if dtype not in (torch.bfloat16, torch.float32):
            raise InvalidArgumentError(f"decode dtype must be bfloat16 or float32, got {dtype}.")
        if not 0 <= expert < self.spec.num_experts or not self.has_expert(expert):
            raise InvalidArgumentError(f"expert {expert} is not attached.")
        rows, cols = self.spec.gate_up_shape if projection == "gate_up" else self.spec.down_shape
        if out is None:
            out = torch.empty(rows, cols, dtype=dtype, device="cpu")
        if out.dtype != dtype or tuple(out.shape) != (rows, cols) or not out.is_contiguous():
            raise InvalidArgumentError(f"out must be a contiguous {dtype} tensor of shape ({rows}, {cols}).")
        variant, bf16 = self._variant(dtype)
        rc = variant.decode(
            self._layer_ref,
            int(projection == "down"),
            expert,
            out.data_ptr(),
            DT_BF16 if dtype == torch.bfloat16 else DT_F32,
            int(bf16),
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"internal error: kernel decode returned {rc} ({ERRORS.get(rc, '?')})")
        return out
