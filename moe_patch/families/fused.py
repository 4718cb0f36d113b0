"""Experts stored as 3-D parameters on one module (transformers 5 layout).

- ``ExpertsInterfaceFamily``: classes decorated with ``@use_experts_implementation`` (64 families in
  transformers 5.23). We register ``"moe_patch"`` in transformers' own experts registry and let the
  module's config select it (through :class:`ExpertsConfigView`): no transformers class is modified.
  Offloaded, the experts module gets a routed forward whose runner is the offload engine.
- ``PlainFusedFamily``: same call signature and layout without the decorator (e.g. step3p7).
- ``ZeroExpertsFamily``: LongCat-Flash, whose router may pick identity "zero computation" experts.

The undecorated ones get an instance forward and nothing else: transformers recognises decorated
experts by ``has_gate`` / ``is_transposed`` (expert-parallel plans, exporters), so those flags are never
added to a module that did not have them; the layout is read from the parameters' shapes instead.
"""

from __future__ import annotations

import enum
import inspect
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.core import dispatch_combine, plan_dispatch
from ..dispatch.experts import (
    IMPLEMENTATION_NAME,
    ExpertBank,
    bank_dispatch,
    bank_expert,
    expert_weight_names,
    fused_bank,
    fused_expert_forward,
    glu,
)
from ..validation import NAME_ATTR, VALIDATE_ATTR, check_routing
from .base import ExpertTensors, Family, KernelMaths, PatchOptions, param_3d, run_experts
from .records import SAVED_ATTR, bind_forward, set_attrs

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle


def register_experts_implementation() -> None:
    """Add ``"moe_patch"`` to transformers' experts registry (idempotent; the registry is the
    explicit extension point transformers provides for third parties)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from .implementation import moe_patch_experts_forward  # local: it imports this module's neighbours

    if IMPLEMENTATION_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, moe_patch_experts_forward)


class _Chosen(enum.Enum):
    """A view's ``replaces`` once an implementation was chosen by name (an enum member survives copy and pickle)."""

    BY_NAME = "chosen by name"


class ExpertsConfigView:
    """What a patched experts module holds as its ``config``: the model's own config object, read and
    written through, except that the experts implementation reads ``"moe_patch"`` while that config
    still selects the implementation it selected at patch time (``replaces``) and none was chosen by name since.

    So ``model.set_experts_implementation(name)`` takes effect on a patched model, ``name`` being any
    implementation, the one moe-patch stood in for included (:class:`ChoiceByName` tells the view), and two
    models sharing one config object are patched independently (each patched module has its own view).
    """

    __slots__ = ("_moe_patch_config", "_moe_patch_replaces")

    def __init__(self, config: Any, replaces: str | None | _Chosen):
        object.__setattr__(self, "_moe_patch_config", config)
        object.__setattr__(self, "_moe_patch_replaces", replaces)

    @property
    def _experts_implementation(self) -> str | None:
        current = self._moe_patch_config._experts_implementation
        return IMPLEMENTATION_NAME if current == self._moe_patch_replaces else current

    def hand_over(self) -> None:
        """From now on the experts run what the model's config selects (until ``patch_model`` patches anew)."""
        object.__setattr__(self, "_moe_patch_replaces", _Chosen.BY_NAME)

    @property
    def selects_moe_patch(self) -> bool:
        return self._experts_implementation == IMPLEMENTATION_NAME

    def __getattr__(self, name: str) -> Any:  # only for names the view itself does not define
        if name.startswith("__") or name in ExpertsConfigView.__slots__:
            raise AttributeError(name)
        return getattr(self._moe_patch_config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._moe_patch_config, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._moe_patch_config, name)

    def __reduce__(self):
        # copy.deepcopy / pickle rebuild the view around the copied config (the model's copy).
        return (ExpertsConfigView, (self._moe_patch_config, self._moe_patch_replaces))

    def __repr__(self) -> str:
        return f"ExpertsConfigView(replaces={self._moe_patch_replaces!r}, config={self._moe_patch_config!r})"


class ChoiceByName:
    """``set_experts_implementation`` of a model holding patched decorated experts: transformers' own, then every
    experts view it addressed is handed over. For transformers, choosing the implementation the config already
    selects changes nothing, so without this the experts moe-patch stands in for could not be given back to that
    implementation by name (and half-precision experts kept moe-patch's calibrated fp32 path). An object with
    ``__reduce__``: a deepcopy or a pickled copy of the model gets one bound to itself. It holds its model weakly,
    so the model is not kept alive by a reference cycle (freed when the last user reference goes, not at the next
    garbage collection: its weights can be gigabytes)."""

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)
        self.__wrapped__ = type(model).set_experts_implementation  # what help() and inspect show

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def __call__(self, experts_implementation: str | dict) -> None:
        model = self.model
        type(model).set_experts_implementation(model, experts_implementation)
        config = model.config
        chosen = (
            None
            if isinstance(experts_implementation, str)
            else {id(config if key == "" else getattr(config, key, None)) for key in experts_implementation}
        )
        for module in model.modules():
            view = module.__dict__.get("config")
            if isinstance(view, ExpertsConfigView) and (chosen is None or id(view._moe_patch_config) in chosen):
                view.hand_over()

    def __reduce__(self):
        return (ChoiceByName, (self.model,))


def install_choice_by_name(root: torch.nn.Module) -> None:
    """Give each transformers model under ``root`` that holds patched decorated experts a :class:`ChoiceByName`
    (an instance attribute recorded by ``set_attrs``: unpatching removes it; the class keeps its method)."""
    from transformers import PreTrainedModel

    for model in root.modules():
        if isinstance(model, PreTrainedModel) and any(
            isinstance(m.__dict__.get("config"), ExpertsConfigView) for m in model.modules()
        ):
            set_attrs(model, set_experts_implementation=ChoiceByName(model))


def dispatches(module: torch.nn.Module) -> bool | None:
    """Whether a module moe-patch changed dispatches through moe-patch now; None for a model that only holds a
    :class:`ChoiceByName` (it dispatches nothing itself)."""
    view = module.__dict__.get("config")
    if isinstance(view, ExpertsConfigView):
        return view.selects_moe_patch
    if set(module.__dict__.get(SAVED_ATTR, ())) == {"set_experts_implementation"}:
        return None
    return True


def is_decorated(experts: torch.nn.Module) -> bool:
    """Instances of classes decorated by ``use_experts_implementation`` carry these flags and a config."""
    return all(hasattr(experts, a) for a in ("has_gate", "is_transposed", "_apply_gate", "config")) and (
        param_3d(experts, "down_proj") is not None
    )


def _fused_sizes(experts: torch.nn.Module, transposed: bool) -> tuple[int, int]:
    down = experts.down_proj
    return (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])


def _fused_layout(
    experts: torch.nn.Module, transposed: bool, gated: bool, bias: bool, post_norm: bool, interleaved: bool
) -> ExpertLayout:
    first = "gate_up_proj" if gated else "up_proj"
    names = [first] + ([first + "_bias"] if bias else []) + ["down_proj"] + (["down_proj_bias"] if bias else [])
    return ExpertLayout(
        storage="fused",
        gated=gated,
        transposed=transposed,
        interleaved=interleaved,
        bias=bias,
        post_norm=post_norm,
        param_names=tuple(names),
    )


def _routed_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts' call signature, computed by the installed runner (the offload engine)."""
    return run_experts(self, hidden_states, top_k_index, top_k_weights)


class ExpertsInterfaceFamily(Family):
    name = "experts_interface"
    offload_unsupported = None

    def match(self, block, name, experts) -> bool:
        return is_decorated(experts)

    def layout(self, experts) -> ExpertLayout:
        return _fused_layout(
            experts,
            bool(experts.is_transposed),
            bool(experts.has_gate),
            bool(experts.has_bias),
            bool(experts.has_post_expert_norm),
            not getattr(experts, "is_concatenated", True),
        )

    def sizes(self, experts) -> tuple[int, int]:
        return _fused_sizes(experts, bool(experts.is_transposed))

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        register_experts_implementation()
        experts = handle.experts
        view = ExpertsConfigView(experts.config, replaces=experts.config._experts_implementation)
        set_attrs(experts, config=view, **{NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate})

    def bind_routed(self, handle: BlockHandle) -> None:
        bind_forward(handle.experts, _routed_forward)

    def expert_tensors(self, experts) -> ExpertTensors:
        names = expert_weight_names(experts)
        return ExpertTensors(
            names,
            {n: tuple(getattr(experts, n).shape[1:]) for n in names},
            experts.down_proj.dtype,
            int(experts.num_experts),
        )

    def slot_bank(self, experts, weights) -> ExpertBank:
        return fused_bank(experts, weights)

    def compute_expert(self, experts, expert, x, weights) -> torch.Tensor:
        return fused_expert_forward(experts, x, weights)

    def kernel_maths(self, experts) -> KernelMaths | None:
        return decorated_kernel_maths(experts)


def decorated_kernel_maths(experts: torch.nn.Module) -> KernelMaths | None:
    """The kernels' maths of decorated experts: transformers' default gate (``act(gate) * up`` over [gate; up]
    halves) with silu or tanh-gelu, or gpt-oss's own clamped SwiGLU over interleaved rows (its alpha and limit);
    None for any other gate (a family's own ``_apply_gate``), post-expert norms or ungated experts."""
    from transformers.integrations.moe import _default_apply_gate

    from .kernel import activation_name

    if not experts.has_gate or experts.has_post_expert_norm:
        return None
    names = dict(gate_up="gate_up_proj", down="down_proj", transposed=bool(experts.is_transposed))
    if experts.has_bias:
        names.update(gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias")
    gate = type(experts)._apply_gate
    if gate is _default_apply_gate:
        act = activation_name(getattr(experts, "act_fn", None))
        if act is None or not getattr(experts, "is_concatenated", True):
            return None
        return KernelMaths(**names, activation=act)
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    if gate is GptOssExperts._apply_gate:
        return KernelMaths(
            **names,
            activation="gpt_oss",
            glu_layout="interleaved",
            alpha=float(experts.alpha),
            limit=float(experts.limit),
        )
    return None


def _has_routed_signature(experts: torch.nn.Module) -> bool:
    """forward(hidden_states, top_k_index, top_k_weights): the transformers 5 experts signature."""
    try:
        params = list(inspect.signature(type(experts).forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 4


def _plain_transposed(experts: torch.nn.Module) -> bool | None:
    gu, down = experts.gate_up_proj, experts.down_proj
    if gu.shape[-1] == down.shape[-2] and gu.shape[-2] == 2 * down.shape[-1]:
        return False
    if gu.shape[-2] == down.shape[-1] and gu.shape[-1] == 2 * down.shape[-2]:
        return True
    return None


def _plain_bank(experts: torch.nn.Module, transposed: bool) -> ExpertBank:
    """[gate; up] experts without the decorator's flags: the module's own ``_apply_gate`` when its class
    has one (step3p7 clamps there), else ``act(gate) * up``."""
    activate = experts._apply_gate if hasattr(type(experts), "_apply_gate") else glu(experts.act_fn)
    return ExpertBank(up=experts.gate_up_proj, down=experts.down_proj, activate=activate, transposed=transposed)


def _plain_fused_forward(self, hidden_states, top_k_index, top_k_weights):
    check_routing(self, top_k_index, top_k_weights, int(self.down_proj.shape[0]))
    bank = _plain_bank(self, bool(_plain_transposed(self)))
    return bank_dispatch(bank, hidden_states, top_k_index, top_k_weights)


class PlainFusedFamily(Family):
    """Fused [gate; up] experts with the transformers 5 call signature but no decorator."""

    name = "fused_plain"
    offload_unsupported = (
        "undecorated fused experts (step3p7) carry no layout flags the offloaded forward could "
        "follow; they stay resident"
    )

    def match(self, block, name, experts) -> bool:
        gu, down = param_3d(experts, "gate_up_proj"), param_3d(experts, "down_proj")
        return (
            gu is not None
            and down is not None
            and gu.shape[0] == down.shape[0]
            and not is_decorated(experts)
            and _has_routed_signature(experts)
            and _plain_transposed(experts) is not None
        )

    def num_experts(self, experts) -> int:
        return int(experts.down_proj.shape[0])

    def layout(self, experts) -> ExpertLayout:
        return _fused_layout(experts, bool(_plain_transposed(experts)), True, False, False, False)

    def sizes(self, experts) -> tuple[int, int]:
        return _fused_sizes(experts, bool(_plain_transposed(experts)))

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        experts = handle.experts
        set_attrs(experts, **{NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate})
        bind_forward(experts, _plain_fused_forward)


def _zero_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """LongCat-Flash: expert ids >= num_routed_experts are identity experts."""
    total = self.num_routed_experts + self.zero_expert_num
    if top_k_index.numel() == 0:
        return torch.zeros_like(hidden_states)
    check_routing(self, top_k_index, top_k_weights, total)
    routed = self.num_routed_experts
    bank = _plain_bank(self, transposed=False)

    def expert_fn(e: int, x: torch.Tensor) -> torch.Tensor:
        if e >= routed:
            return x
        return bank_expert(bank, e, x)

    plan = plan_dispatch(top_k_index, total)
    return dispatch_combine(hidden_states, top_k_index, top_k_weights, total, expert_fn, plan=plan)


#: Why a block with zero-computation experts stays resident, whichever module handles them.
ZERO_EXPERTS_RESIDENT = (
    "LongCat-Flash's zero-computation experts are routed beside the real ones; the offload "
    "engine pages real experts only, so these blocks stay resident"
)


class ZeroExpertsFamily(Family):
    name = "zero_experts"
    offload_unsupported = ZERO_EXPERTS_RESIDENT

    def match(self, block, name, experts) -> bool:
        return (
            hasattr(experts, "zero_expert_num")
            and hasattr(experts, "num_routed_experts")
            and param_3d(experts, "down_proj") is not None
            and _has_routed_signature(experts)
        )

    def num_experts(self, experts) -> int:
        return int(experts.num_routed_experts)

    def layout(self, experts) -> ExpertLayout:
        return _fused_layout(experts, False, True, False, False, False)

    def sizes(self, experts) -> tuple[int, int]:
        return _fused_sizes(experts, False)

    def params_per_expert(self, experts) -> int:
        return experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        experts = handle.experts
        set_attrs(experts, **{NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate})
        bind_forward(experts, _zero_experts_forward)
