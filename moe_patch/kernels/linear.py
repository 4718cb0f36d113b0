"""One dense projection ``y = x @ W.T + b`` computed by the native kernels' GEMV (a decode step's dense linears).

At one to a few rows a linear layer only streams its weight, and torch's CPU ``F.linear`` reads bf16 weights at
about half of what the kernels' row loop reaches on the same machine (``./dev bench kernels``). A dense weight is
an expert of one: :class:`LinearKernel` runs the kernels' gate_up pass (bias added, one rounding into the output
dtype) over a one-expert table whose only entry is the module's own weight, referenced, not copied. Whether it
beats torch on this machine, and up to how many rows, is measured once per machine
(:meth:`~.crossover.Crossovers.linear_rows`); callers fall back to ``F.linear`` above that, and for gradients,
autocast and compiled graphs (``moe_patch/dense_linears.py``).
"""

from __future__ import annotations

import ctypes

import torch

from ..errors import InvalidArgumentError
from .errors import KernelUnavailableError
from .layer import MAX_TOKENS, Workspace, check_2d, invoke, pick_variants
from .library import ACTIVATIONS, GLU_LAYOUTS, KERNELS, MODE_GATE_UP, PTRS, MpLayer
from .spec import FLOAT_DTYPES, ExpertFormat

# the one expert every row is routed to (read-only; a slice of it is each call's routing)
_ZERO_IDX = torch.zeros(MAX_TOKENS, 1, dtype=torch.int64, device="cpu")
_GU_W, _GU_B = 0, 3  # pointer-table columns (mp_common.h: MP_GU_W, MP_GU_B)


class LinearKernel:
    """``weight`` ([out, in], bf16, fp16 or fp32, CPU, rows contiguous) and an optional ``bias`` [out] computed by
    the kernels. bf16 inputs compute as the bf16 experts do (bf16 products, fp32 sums); fp16/fp32 in fp32.

    Raises :class:`KernelUnavailableError` where the kernels do not run here or cannot read ``weight``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, isa: str | None = None):
        status = KERNELS.status()
        if not status.available:
            raise KernelUnavailableError(status.reason)
        fmt = ExpertFormat.dense(weight.dtype) if isinstance(weight, torch.Tensor) else None
        if fmt is None or weight.dim() != 2 or not weight.is_cpu:
            raise KernelUnavailableError(
                f"the kernels read 2-D CPU bf16/fp16/fp32 weights, got {getattr(weight, 'dtype', type(weight))}"
            )
        rows, cols = weight.shape
        if rows == 0 or cols == 0 or weight.stride(1) != 1 or weight.stride(0) != cols:
            raise KernelUnavailableError("the weight is empty or not contiguous")
        if bias is not None:
            if bias.dim() != 1 or bias.shape[0] != rows or bias.dtype not in FLOAT_DTYPES or not bias.is_cpu:
                raise KernelUnavailableError(f"bias of shape {tuple(bias.shape)} {bias.dtype} for {rows} outputs")
            bias = bias.contiguous()
            fmt = ExpertFormat(fmt.kind, bias=bias.dtype)
        self._bf16, self._fp32 = pick_variants(status.variants, isa)
        self.weight, self.bias = weight, bias  # held: the table points into them
        self.out_features, self.in_features = rows, cols
        self._table = torch.zeros(1, PTRS, dtype=torch.int64, device="cpu")  # a default device must not move it
        self._table[0, _GU_W] = weight.data_ptr()
        if bias is not None:
            self._table[0, _GU_B] = bias.data_ptr()
        layer = MpLayer()
        layer.gu = fmt.proj(rows, cols)
        layer.dn = fmt.proj(cols, 1)  # never read by a gate_up call; a valid description all the same
        layer.num_experts, layer.hidden, layer.inter = 1, cols, 1
        layer.glu, layer.act = GLU_LAYOUTS["halves"], ACTIVATIONS["silu"]
        layer.table = self._table.data_ptr()
        self._layer, self._layer_ref = layer, ctypes.byref(layer)
        self._ws_bytes: dict[tuple, int] = {}
        #: name of the variant that ran the last call (tests assert the compiled path ran)
        self.last_variant: str | None = None

    def __call__(self, x: torch.Tensor, *, workspace: Workspace | None = None) -> torch.Tensor:
        """``x [..., in]`` (float32, bfloat16 or float16) -> ``[..., out]`` in ``x``'s dtype."""
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        check_2d(x2, "x", FLOAT_DTYPES, None, self.in_features)
        bf16 = x.dtype == torch.bfloat16
        variant = self._bf16 if bf16 else self._fp32
        if variant is None:
            raise InvalidArgumentError(f"no fp32 variant runs here for {x.dtype} inputs")
        rows = x2.shape[0]
        out = torch.empty(rows, self.out_features, dtype=x.dtype, device="cpu")
        for t0 in range(0, rows, MAX_TOKENS):  # one call for a decode step: no slices made
            n = min(rows - t0, MAX_TOKENS)
            xs, os_ = (x2, out) if n == rows else (x2[t0 : t0 + n], out[t0 : t0 + n])
            args = (MODE_GATE_UP, xs, _ZERO_IDX, None, os_, n, 1, False, False, workspace)
            invoke(variant, bf16, self._layer_ref, self._ws_bytes, *args)
        self.last_variant = variant.name
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)
