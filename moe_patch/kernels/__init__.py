"""Native CPU kernels for routed MoE experts, computed straight from their stored bytes.

bf16, fp16, fp32, FP8 e4m3 (block, channel or tensor scales; float or ue8m0), MXFP4 (gpt-oss) and
compressed-tensors int4/int8 experts: one call per MoE layer (gate_up, activation, down, weighted sum),
each weight read once and decoded in registers, multi-threaded on torch's OpenMP pool. Compiled on first
use with the system C compiler, probed per CPU, and off (callers keep torch) where that fails or with
``MOE_PATCH_KERNELS=0``. Design and measurements: ``moe_patch/kernels/README.md``.

Usage (a format strategy or an engine)::

    from moe_patch import kernels
    if kernels.available():
        spec = kernels.MoELayerSpec(num_experts=32, hidden=2880, intermediate=2880,
                                    gate_up=kernels.ExpertFormat("mxfp4", bias=torch.bfloat16),
                                    down=kernels.ExpertFormat("mxfp4", bias=torch.bfloat16),
                                    activation="gpt_oss", glu_layout="interleaved")
        layer = kernels.MoEKernel(spec)            # KernelUnavailableError: keep the torch path
        layer.set_expert(e, kernels.ExpertWeights(gate_up=blocks, gate_up_scale=scales, ...))
        out = layer.forward(x, top_k_index, top_k_weights)
"""

from .errors import KernelUnavailableError
from .layer import WORKSPACES, MoEKernel, Workspace
from .library import KERNELS, KernelStatus, available, status
from .spec import ExpertFormat, ExpertWeights, MoELayerSpec

__all__ = [
    "KERNELS",
    "WORKSPACES",
    "ExpertFormat",
    "ExpertWeights",
    "KernelStatus",
    "KernelUnavailableError",
    "MoEKernel",
    "MoELayerSpec",
    "Workspace",
    "available",
    "status",
]
