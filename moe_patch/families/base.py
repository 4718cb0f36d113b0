"""What a family is: how moe-patch recognises one layout of experts and drives it, resident or offloaded.

A family is the only code that knows a layout's quirks. For a (block, experts) pair found while walking a
model it answers: is this mine (:meth:`Family.match`), how are the weights laid out (:meth:`Family.layout`,
sizes), how to install the fast dispatch on a resident model (:meth:`Family.install`), and, for offloading,
which per-expert tensors there are, how one expert's slice is cut from a stacked parameter and from the
checkpoint, the bank a slot range of cached experts forms, one expert's maths from fetched weights, and how
the offload engine is installed (:meth:`Family.install_offload`). Families change modules only through
:mod:`.records`.

Both installs route the experts' computation through a *runner* kept on the experts module
(:func:`run_experts`): the resident runner checks the routing and dispatches over the module's own weights;
the offload engine's runner pages the experts. A family's forward calls :func:`run_experts` and is the same
code in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.experts import ExpertBank, bank_dispatch, bank_expert
from ..validation import NAME_ATTR, VALIDATE_ATTR, check_routing
from .records import set_attrs

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle

#: instance attribute of an experts module: the :class:`Runner` that computes its routed experts
RUNNER_ATTR = "_moe_patch_runner"


@dataclass
class PatchOptions:
    """Options of :func:`moe_patch.patch_model` that families see.

    Attributes:
        validate: check router output (finite weights, indices in range) before every dispatch;
            costs one host sync per block. Turn off for speed once a model is known good.
    """

    validate: bool = True


@dataclass(frozen=True)
class ExpertTensors:
    """One block's per-expert tensors as the offload engine pages them.

    ``names``: parameter paths inside the experts module (``gate_up_proj``, ``mlp.w1``), or inside one expert
    module for expert lists (``w1.weight``); ``shapes``: one expert's shape of each; ``dtype``: their dtype.
    """

    names: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    num_experts: int

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in the model dtype."""
        return sum(math.prod(s) for s in self.shapes.values()) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class KernelMaths:
    """What a family's experts compute, in the CPU kernels' terms (:class:`moe_patch.kernels.MoELayerSpec`):
    the per-expert tensors that are the two projections and their biases, the activation and the gate/up layout.

    Attributes:
        gate_up / down: names of the projections among the family's per-expert tensors (``gate_up_proj`` ...).
        gate_up_bias / down_bias: names of their biases, or None.
        transposed: the model holds the projections as ``[in, out]`` (the kernels read ``[out, in]`` bytes only:
            stored formats that keep the other orientation, such as MXFP4, still qualify).
        activation / glu_layout / alpha / limit: as :class:`~moe_patch.kernels.MoELayerSpec`.
    """

    gate_up: str
    down: str
    gate_up_bias: str | None = None
    down_bias: str | None = None
    transposed: bool = False
    activation: str = "silu"
    glu_layout: str = "halves"
    alpha: float = 1.702
    limit: float = 7.0


class Runner(Protocol):
    """Computes a block's routed experts: ``(experts, x [T, H], top_k_index, top_k_weights) -> [T, H]``."""

    def __call__(
        self,
        experts: torch.nn.Module,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        weight_inputs: bool = False,
    ) -> torch.Tensor: ...


def run_experts(
    experts: torch.nn.Module,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    weight_inputs: bool = False,
) -> torch.Tensor:
    """The routed experts of ``x`` through the runner installed on ``experts`` (resident or offloaded).
    ``weight_inputs``: scale each expert's input by its routing weight instead of its output (Llama 4)."""
    return experts.__dict__[RUNNER_ATTR](experts, x, top_k_index, top_k_weights, weight_inputs=weight_inputs)


@dataclass(frozen=True)
class ResidentRunner:
    """The resident model's runner: the routing check, then the dispatch over the experts' own weights."""

    bank: Callable[[torch.nn.Module], ExpertBank]
    num_experts: int | None = None  # the routing check's bound when it is not the module's num_experts

    def __call__(self, experts, x, top_k_index, top_k_weights, *, weight_inputs=False):
        check_routing(experts, top_k_index, top_k_weights, self.num_experts)
        return bank_dispatch(self.bank(experts), x, top_k_index, top_k_weights, weight_inputs=weight_inputs)


class OffloadRunner(Protocol):
    """What the offload engine gives a family to install: the routed-experts runner of one layer, and the
    per-expert calls for blocks that loop over their experts themselves."""

    def __call__(
        self,
        experts: torch.nn.Module,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        weight_inputs: bool = False,
    ) -> torch.Tensor: ...

    def begin_layer(self, hidden: torch.Tensor) -> None: ...

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor: ...

    def end_layer(self) -> None: ...


class Family:
    """Base class; subclasses override what differs. Stateless: per-block state lives on the handle.

    Offloading: a family that cannot be offloaded says why in ``offload_unsupported`` (the offload engine
    leaves such blocks resident and the test of every family checks the reason is there).
    """

    name: str = "family"
    #: Set by families whose routing is not read from a router (e.g. one expert per image).
    fixed_top_k: int | None = None
    routing_kind: str | None = None
    #: How the monitor reads this layout's routing when the experts' call does not carry it: the name of a
    #: reader in ``moe_patch.monitoring.readers`` applied to the router's output (None: the experts' call).
    routing_reader: str | None = None
    #: None when the offload engine can page this family's experts; otherwise why it cannot.
    offload_unsupported: str | None = "no offloaded forward for this layout"

    # -- detection --------------------------------------------------------------------------------
    def match(self, block: torch.nn.Module, name: str, experts: torch.nn.Module) -> bool:
        raise NotImplementedError

    def num_experts(self, experts: torch.nn.Module) -> int:
        return int(experts.num_experts)

    def layout(self, experts: torch.nn.Module) -> ExpertLayout:
        raise NotImplementedError

    def sizes(self, experts: torch.nn.Module) -> tuple[int, int]:
        """(hidden_size, intermediate_size) of one expert."""
        raise NotImplementedError

    def params_per_expert(self, experts: torch.nn.Module) -> int:
        e = self.num_experts(experts)
        return sum(p.numel() for p in experts.parameters()) // max(e, 1)

    # -- resident ------------------------------------------------------------------------------------
    def install(self, handle: BlockHandle, options: PatchOptions) -> str | None:
        """Install the dispatch on this block through :mod:`.records` only (what it records,
        :func:`~.records.restore` puts back). Returns None, or why the block was left as it was."""
        raise NotImplementedError

    def lora_targets(self, handle: BlockHandle) -> tuple[list[str], list[str]] | None:
        """(target_modules, target_parameters) that give each routed expert of this block its own peft LoRA:
        by default the 3-D expert weights (peft's ``target_parameters``); None when peft cannot adapt them
        per expert."""
        out = []
        for name in handle.info.layout.param_names:
            if name.endswith("bias"):
                continue
            for owner, path in ((handle.experts, handle.info.experts_path), (handle.block, handle.info.path)):
                try:
                    param = owner.get_parameter(name)
                except AttributeError:
                    continue
                if param.dim() == 3:
                    out.append(f"{path}.{name}" if path else name)
                    break
            else:
                return None
        return [], out

    # -- offloaded -----------------------------------------------------------------------------------
    def expert_tensors(self, experts: torch.nn.Module) -> ExpertTensors:
        """The per-expert tensors the engine pages (read while the weights are still there)."""
        raise NotImplementedError

    def expert_slice(self, full: torch.Tensor, expert: int, num_experts: int) -> torch.Tensor:
        """Expert ``expert``'s part of one stacked parameter (a view)."""
        return full[expert]

    def stack(self, per_expert: list[torch.Tensor]) -> torch.Tensor:
        """The stacked parameter from every expert's slice (inverse of :meth:`expert_slice`)."""
        return torch.stack(per_expert)

    def expert_param_path(self, experts: torch.nn.Module, expert: int, name: str) -> str | None:
        """The path (inside the experts module) of expert ``expert``'s tensor ``name`` when it is a parameter
        of its own (experts kept as a list of modules), or None when it is that expert's row of the stacked
        parameter ``name``. The checkpoint stores it the same way."""
        return None

    def parameter_paths(self, experts: torch.nn.Module, tensors: ExpertTensors) -> list[str]:
        """The parameters (paths inside the experts module) that hold the experts: swapped for placeholders
        while offloaded."""
        own = [self.expert_param_path(experts, e, n) for e in range(tensors.num_experts) for n in tensors.names]
        return list(tensors.names) if not own or own[0] is None else own

    def checkpoint_split(self, num_experts: int) -> int | None:
        """For stacked checkpoint tensors: split dimension 0 into this many equal chunks per expert (DBRX's
        ``[E * F, H]``), or None when dimension 0 is the expert index."""
        return None

    def slot_bank(self, experts: torch.nn.Module, weights: dict[str, torch.Tensor]) -> ExpertBank:
        """The bank of ``experts``' maths over ``weights`` stacked ``[N, ...]`` per tensor (the engine's slots)."""
        raise NotImplementedError

    def kernel_maths(self, experts: torch.nn.Module) -> KernelMaths | None:
        """What these experts compute in the CPU kernels' terms, or None when the kernels cannot compute it
        (an activation or gate they do not have): then torch computes them, as before."""
        return None

    def compute_expert(
        self, experts: torch.nn.Module, expert: int, x: torch.Tensor, weights: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Expert ``expert`` on rows ``x`` from its fetched ``weights`` (decoded, on x's device)."""
        return bank_expert(self.slot_bank(experts, {n: t.unsqueeze(0) for n, t in weights.items()}), 0, x)

    def install_offload(self, handle: BlockHandle, runner: OffloadRunner, hooks: list[Any]) -> None:
        """Route this block's experts through the offload engine's ``runner``, through :mod:`.records`
        (forward hooks it adds go into ``hooks``, which detaching removes). Default: the experts module
        gets the runner and the family's forward that calls :func:`run_experts` (:meth:`bind_routed`)."""
        set_attrs(handle.experts, **{RUNNER_ATTR: runner, NAME_ATTR: handle.info.experts_path})
        self.bind_routed(handle)

    def install_resident(self, handle: BlockHandle, options: PatchOptions, runner: Runner) -> None:
        """The resident counterpart of :meth:`install_offload`, for families whose forward calls
        :func:`run_experts`: the same forward, the resident runner, and the routing check's options."""
        set_attrs(
            handle.experts,
            **{RUNNER_ATTR: runner, NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate},
        )
        self.bind_routed(handle)

    def bind_routed(self, handle: BlockHandle) -> None:
        """Bind the family's forward (it computes the routed experts with :func:`run_experts`)."""
        raise NotImplementedError


def param_3d(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    p = module._parameters.get(name) if isinstance(module, torch.nn.Module) else None
    return p if p is not None and p.dim() == 3 else None
