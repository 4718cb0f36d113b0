"""Experts as a ``ModuleList``/``ModuleDict`` of MLP modules (transformers 4.x style, remote code such as
DeepSeek-V2's, Switch Transformers, NLLB-MoE).

Two ways such experts are driven:
- the block calls ``experts(hidden, routing...)`` (Switch, NLLB-MoE): we replace that call only;
- the block loops over ``self.experts`` itself (4.x Mixtral, DeepSeek-V2 remote code): we replace the
  block's forward with a generic routed forward built from what detection read (router, routing
  kind, shared experts) and install it only if it reproduces the original block on a probe input.

For inference, plain GLU/MLP experts are *repacked*: each expert's weights are moved into one
contiguous ``[E, ...]`` tensor and every expert parameter is re-pointed at its slice (same Parameter
objects, same values, no extra memory), so a grouped GEMM can run all experts at once. Each parameter
keeps a storage of its own over its slice, so state dicts, ``save_pretrained``, safetensors and
transformers' tied-weights checks see independent tensors, as before patching. The pack is a cache:
rebuilt on first use after the weights moved (``model.to(...)``) and in a copy of the model.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..detect.spec import ExpertLayout
from ..detect.structure import find_router
from ..dispatch.core import dispatch_combine
from ..dispatch.experts import ExpertBank, bank_dispatch, glu
from ..validation import NAME_ATTR, VALIDATE_ATTR, check_routing
from .base import ExpertTensors, Family, OffloadRunner, PatchOptions
from .records import bind_forward, restore, set_attrs

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle

#: (gate, up, down) parameter-holder names of one expert, in the conventions seen in the wild.
GLU_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
MLP_NAMES = (("up_proj", "down_proj"), ("fc1", "fc2"), ("wi", "wo"), ("c_fc", "c_proj"), ("w1", "w2"))
ACT_NAMES = ("act_fn", "act", "activation_fn", "activation", "act_func")

#: How close the generic forward must come to the block's own on the probe input before it is used.
SELF_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4}
SELF_CHECK_RTOL_HALF = 2e-2  # bf16/fp16: grouped rows round differently


def _experts_list(experts: torch.nn.Module) -> list[torch.nn.Module]:
    """The expert modules, in order: the children of the container's most common type (a ModuleDict
    may also hold helpers such as NLLB-MoE's token dropout)."""
    items = list(experts.values()) if isinstance(experts, torch.nn.ModuleDict) else list(experts)
    if not items:
        return items
    kinds = Counter(type(m) for m in items)
    main = max(kinds, key=kinds.get)
    return [m for m in items if type(m) is main]


def _expert_keys(experts: torch.nn.Module) -> list[str]:
    """The child names of the expert modules, in order (``0, 1, ...`` in a ModuleList; a ModuleDict's keys)."""
    kinds = _experts_list(experts)
    main = type(kinds[0]) if kinds else None
    return [name for name, m in experts.named_children() if type(m) is main]


def _linears(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]


def _is_mlp_list(experts: torch.nn.Module) -> bool:
    if not isinstance(experts, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        return False
    items = _experts_list(experts)
    if len(items) < 2 or len({type(m) for m in items}) != 1:
        return False
    first = items[0]
    lins = _linears(first)
    if len(lins) < 2 or any(isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)) for m in first.modules()):
        return False
    # An MLP maps hidden -> hidden: some layer reads the width the first one reads, another writes it.
    hidden = lins[0].weight.shape[1]
    return any(lin.weight.shape[0] == hidden for lin in lins[1:])


@dataclass(frozen=True)
class _Roles:
    gate: str | None
    up: str
    down: str
    act: str | None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gate, self.up, self.down) if n)


def expert_roles(expert: torch.nn.Module) -> _Roles | None:
    """Names of one expert's gate/up/down Linear children (None if not a recognisable plain MLP)."""
    children = dict(expert.named_children())
    act = next((n for n in ACT_NAMES if callable(getattr(expert, n, None))), None)
    for g, u, d in GLU_NAMES:
        if all(isinstance(children.get(n), torch.nn.Linear) for n in (g, u, d)):
            return _Roles(g, u, d, act)
    for u, d in MLP_NAMES:
        if all(isinstance(children.get(n), torch.nn.Linear) for n in (u, d)):
            return _Roles(None, u, d, act)
    return None


def _sizes(experts: torch.nn.Module) -> tuple[int, int]:
    lins = _linears(_experts_list(experts)[0])
    hidden = int(lins[0].weight.shape[1])
    return hidden, int(next(lin.weight.shape[1] for lin in lins if lin.weight.shape[0] == hidden))


# --------------------------------------------------------------------------- repacking (inference fast path)

#: The experts container's pack slot (:class:`_PackSlot`).
PACK_ATTR = "_moe_patch_packed"


@dataclass(frozen=True)
class _Packed:
    roles: _Roles
    up: torch.Tensor  # [E, 2I or I, H]: [gate; up] rows when gated
    down: torch.Tensor  # [E, H, I]
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    #: Data pointer of every member tensor (:func:`_member_tensors`) at pack time: the pack stands for
    #: the experts only while each of them is still exactly there (checked before every use, so cheap).
    members: tuple[int, ...]

    def stands_for(self, items: list[torch.nn.Module]) -> bool:
        """False once the experts changed under the pack: a LoRA or hook added after patching, a module
        swapped, or parameters moved (``model.to(...)``, ``half()``, peft's merge, a copy of the model)."""
        if not all(_plain(m, self.roles) for m in items):
            return False
        tensors = _member_tensors(items, self.roles)
        if len(tensors) != len(self.members) or (tensors[0].device, tensors[0].dtype) != (
            self.up.device,
            self.up.dtype,
        ):
            return False
        return all(t.data_ptr() == ptr for t, ptr in zip(tensors, self.members))


class _PackSlot:
    """Holds the experts' pack, a cache over the expert modules' own weights: rebuilt on first use once
    stale, and empty in a copy of the model (copying the pack would duplicate every expert's memory
    without aliasing the copy's weights)."""

    def __init__(self, packed: _Packed | None = None):
        self.packed = packed

    def current(self, experts: torch.nn.Module) -> _Packed | None:
        items = _experts_list(experts)
        if self.packed is None or not self.packed.stands_for(items):
            self.packed = None  # release a stale pack before packing again
            self.packed = repack(experts)
        return self.packed

    def __reduce__(self):
        return (_PackSlot, ())


def _hooked(m: torch.nn.Module) -> bool:
    # Hooks, or an instance forward (accelerate's hooks replace `forward`), must run.
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _plain(expert: torch.nn.Module, roles: _Roles) -> bool:
    # `_modules` directly: this runs for every expert before each use of the pack.
    mods = [expert._modules.get(n) for n in roles.linears]
    return (
        roles.act is not None
        and not _hooked(expert)
        and all(type(m) is torch.nn.Linear and not _hooked(m) for m in mods)
    )


def _member_tensors(items: list[torch.nn.Module], roles: _Roles) -> list[torch.Tensor]:
    """Every weight and bias of the experts' gate/up/down Linears, expert by expert."""
    return [t for m in items for n in roles.linears for t in m._modules[n]._parameters.values() if t is not None]


def _alias(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a tensor of its own storage. The expert parameters then alias slices of the pack
    without sharing one storage object, which transformers' tied-weights checks and safetensors would
    read as undeclared tied weights: each expert's parameters stay independent tensors (disjoint
    memory, saved and loaded one by one, exactly as before patching)."""
    return torch.from_dlpack(t)


def repack(experts: torch.nn.Module) -> _Packed | None:
    """Move every expert's weights into contiguous ``[E, ...]`` tensors, re-pointing each parameter at
    its slice (values unchanged). Returns None when the experts are not plain MLPs (LoRA, quantised...)."""
    items = _experts_list(experts)
    roles = expert_roles(items[0])
    if roles is None or not all(_plain(m, roles) for m in items):
        return None
    first = [getattr(m, roles.gate) for m in items] if roles.gated else None
    ups = [getattr(m, roles.up) for m in items]
    downs = [getattr(m, roles.down) for m in items]
    w0 = ups[0].weight
    if w0.device.type == "meta" or any(
        lin.weight.dtype != w0.dtype or lin.weight.device != w0.device for lin in ups + downs + (first or [])
    ):
        return None
    if any(t.is_shared() or (t.device.type == "cpu" and t.is_pinned()) for t in _member_tensors(items, roles)):
        return None  # moving memory shared with other processes, or pinned, would quietly undo that
    # Ordinary tensors even when first used under inference_mode: the parameters must stay trainable.
    with torch.inference_mode(False), torch.no_grad():
        rows = [torch.cat([g.weight, u.weight]) if first else u.weight for g, u in zip(first or ups, ups)]
        up = torch.stack(rows)
        down = torch.stack([d.weight for d in downs])
        ub = None
        if ups[0].bias is not None:
            ub = torch.stack([torch.cat([g.bias, u.bias]) if first else u.bias for g, u in zip(first or ups, ups)])
        db = torch.stack([d.bias for d in downs]) if downs[0].bias is not None else None
        inter = ups[0].weight.shape[0]
        try:
            views = []
            for e in range(len(items)):
                if first:
                    views += [(first[e].weight, up[e, :inter]), (ups[e].weight, up[e, inter:])]
                    if ub is not None:
                        views += [(first[e].bias, ub[e, :inter]), (ups[e].bias, ub[e, inter:])]
                else:
                    views.append((ups[e].weight, up[e]))
                    if ub is not None:
                        views.append((ups[e].bias, ub[e]))
                views.append((downs[e].weight, down[e]))
                if db is not None:
                    views.append((downs[e].bias, db[e]))
            aliased = [(param, _alias(view)) for param, view in views]
        except (RuntimeError, TypeError, BufferError):  # a dtype or device DLPack cannot carry
            return None
        for param, alias in aliased:
            param.data = alias
    members = tuple(t.data_ptr() for t in _member_tensors(items, roles))
    return _Packed(roles=roles, up=up, down=down, up_bias=ub, down_bias=db, members=members)


def _packed_bank(experts: torch.nn.Module, packed: _Packed) -> ExpertBank:
    act = getattr(_experts_list(experts)[0], packed.roles.act)
    return ExpertBank(
        up=packed.up,
        down=packed.down,
        activate=glu(act) if packed.roles.gated else act,
        up_bias=packed.up_bias,
        down_bias=packed.down_bias,
    )


def _inference(experts: torch.nn.Module) -> bool:
    """The pack serves inference only: in training, under autograd (it is not the parameters autograd
    tracks) and while compiling (repacking changes parameters' data) the expert modules run themselves."""
    if experts.training or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in experts.parameters()))


def run_expert_list(
    experts: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Dispatch rows to a list of expert modules: through the repacked bank (grouped GEMMs, CPU
    upcasting, loop on weight views) for plain experts at inference, else a loop calling each active
    expert module (hooks, LoRA, dropout and autograd kept)."""
    check_routing(experts, top_k_index, top_k_weights, num_experts)
    slot: _PackSlot | None = getattr(experts, PACK_ATTR, None)
    if slot is not None and _inference(experts):
        packed = slot.current(experts)
        if packed is not None:
            return bank_dispatch(_packed_bank(experts, packed), x, top_k_index, top_k_weights)
    items = _experts_list(experts)
    return dispatch_combine(x, top_k_index, top_k_weights, num_experts, lambda e, rows: items[e](rows))


# --------------------------------------------------------------------------- the generic block forward


def _route(block: torch.nn.Module, router_out, num_experts: int, top_k: int):
    """(logits or None, top_k_index, top_k_weights) from whatever the router returned."""
    spec = block._moe_patch_routing
    tensors = list(router_out) if isinstance(router_out, (tuple, list)) else [router_out]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0]  # drop scalar aux losses
    idx = next(
        (
            t
            for t in tensors
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2 and t.shape[-1] == top_k
        ),
        None,
    )
    logits = next(
        (t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1] == num_experts),
        None,
    )
    if idx is not None:
        w = next(t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == idx.shape)
        return logits, idx, w
    logits2 = logits.reshape(-1, num_experts)
    if spec.kind == "sigmoid":
        probs = torch.sigmoid(logits2.float())
        w, idx = torch.topk(probs, top_k, dim=-1)
    elif spec.kind == "topk_softmax":
        w, idx = torch.topk(logits2, top_k, dim=-1)
        w = F.softmax(w.float(), dim=-1)
    else:
        probs = F.softmax(logits2, dim=-1, dtype=torch.float)
        w, idx = torch.topk(probs, top_k, dim=-1)
    if spec.normalized and spec.kind != "topk_softmax":
        w = w / w.sum(dim=-1, keepdim=True)
    if spec.scaling_factor != 1.0:
        w = w * spec.scaling_factor
    return logits, idx, w


def _generic_block_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    if self.training:
        # Training keeps the block's own forward: remote-code blocks attach auxiliary losses and
        # jitter noise there that a generic forward cannot know about.
        return type(self).forward(self, hidden_states, *args, **kwargs)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    router = getattr(self, self._moe_patch_router)
    experts = getattr(self, self._moe_patch_experts)
    logits, idx, w = _route(self, router(x), self._moe_patch_num_experts, self._moe_patch_top_k)
    y = run_expert_list(experts, x, idx, w.to(x.dtype), self._moe_patch_num_experts)
    for name in self._moe_patch_shared:
        s = getattr(self, name)(x)
        gate = getattr(self, name + "_gate", None)
        y = y + (torch.sigmoid(gate(x)) * s if gate is not None else s)
    y = y.reshape(shape)
    return (y, logits) if self._moe_patch_returns_tuple else y


def _probe(block: torch.nn.Module, hidden: int) -> torch.Tensor | None:
    p = next(block.parameters(), None)
    if p is None or p.device.type == "meta":
        return None
    g = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randn(2, 9, hidden, generator=g).to(p.device, p.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


class ExpertListOffload(Family):
    """Offloading of experts kept as a list of expert modules, which their block calls one at a time: every
    expert module's forward asks the engine (:meth:`OffloadRunner.run_expert`), and hooks around the block
    tell the engine where the layer begins (to prefetch the next one) and ends (its routing is then known)."""

    offload_unsupported = None

    def expert_tensors(self, experts) -> ExpertTensors:
        first = _experts_list(experts)[0]
        params = dict(first.named_parameters())
        return ExpertTensors(
            tuple(params),
            {n: tuple(p.shape) for n, p in params.items()},
            next(iter(params.values())).dtype,
            len(_experts_list(experts)),
        )

    def expert_param_path(self, experts, expert, name) -> str:
        return f"{_expert_keys(experts)[expert]}.{name}"

    def lora_targets(self, handle: BlockHandle) -> tuple[list[str], list[str]]:
        """Expert modules are plain ``nn.Linear`` layers: peft's ``target_modules`` reaches each one."""
        names = [n for n, m in handle.experts.named_modules() if isinstance(m, torch.nn.Linear)]
        return [f"{handle.info.experts_path}.{n}" for n in names], []

    def compute_expert(self, experts, expert, x, weights) -> torch.Tensor:
        # the expert module's own class forward with the fetched tensors in place of its placeholders (its
        # instance forward asks the engine, so torch.func.functional_call would recurse)
        module = _experts_list(experts)[expert]
        slots = []
        for name, value in weights.items():
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            slots.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value
        try:
            return type(module).forward(module, x.to(next(iter(weights.values())).dtype))
        finally:
            for owner, leaf, old in slots:
                owner._parameters[leaf] = old

    def install_offload(self, handle: BlockHandle, runner: OffloadRunner, hooks: list) -> None:
        for e, module in enumerate(_experts_list(handle.experts)):
            set_attrs(module, forward=lambda x, *a, _e=e, **k: runner.run_expert(_e, x))

        def before(module, args, kwargs):
            runner.begin_layer(args[0] if args else next(iter(kwargs.values())))

        hooks.append(handle.block.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(handle.block.register_forward_hook(lambda m, a, o: runner.end_layer()))


class ModuleListFamily(ExpertListOffload):
    """Blocks whose own forward loops over a list of expert MLPs."""

    routing_reader = "router_table"

    name = "module_list"

    def match(self, block, name, experts) -> bool:
        if not _is_mlp_list(experts) or _container_takes_routing(experts):
            return False
        hidden, _ = _sizes(experts)
        return find_router(block, name, len(_experts_list(experts)), hidden)[1] is not None

    def num_experts(self, experts) -> int:
        return len(_experts_list(experts))

    def sizes(self, experts) -> tuple[int, int]:
        return _sizes(experts)

    def layout(self, experts) -> ExpertLayout:
        roles = expert_roles(_experts_list(experts)[0])
        first = _experts_list(experts)[0]
        names = tuple(n for n, _ in first.named_parameters())
        return ExpertLayout(
            storage="module_list",
            gated=bool(roles and roles.gated),
            bias=any(n.endswith("bias") for n in names),
            param_names=names,
        )

    def install(self, handle: BlockHandle, options: PatchOptions) -> str | None:
        block, experts, info = handle.block, handle.experts, handle.info
        if handle.router is None:
            return "no router found next to the experts"
        probe = _probe(block, info.hidden_size)
        reference = None
        if probe is not None:
            reference = _call_eval(block, probe)
        set_attrs(
            block,
            _moe_patch_router=info.router_path.rsplit(".", 1)[-1],
            _moe_patch_experts=info.experts_path.rsplit(".", 1)[-1],
            _moe_patch_num_experts=info.num_experts,
            _moe_patch_top_k=info.top_k,
            _moe_patch_routing=info.routing,
            _moe_patch_shared=tuple(p.rsplit(".", 1)[-1] for p in info.shared_paths if not p.endswith("_gate")),
            _moe_patch_returns_tuple=isinstance(reference, tuple),
        )
        slot = _PackSlot(repack(experts))
        set_attrs(experts, **{NAME_ATTR: info.experts_path, VALIDATE_ATTR: options.validate, PACK_ATTR: slot})
        bind_forward(block, _generic_block_forward)
        if reference is not None:
            ref = reference[0] if isinstance(reference, tuple) else reference
            for candidate in (None, slot):  # the loop over the expert modules, then the repacked bank
                object.__setattr__(experts, PACK_ATTR, candidate)
                out = _call_eval(block, probe)
                out = out[0] if isinstance(out, tuple) else out
                tol = SELF_CHECK_RTOL.get(ref.dtype, SELF_CHECK_RTOL_HALF)
                if out.shape != ref.shape or _rel(out, ref) > tol:
                    restore(block)
                    restore(experts)
                    return (
                        f"generic routed forward does not reproduce this block (routing "
                        f"{info.routing.describe()}); left on its own forward"
                    )
        return None


def _call_eval(block: torch.nn.Module, x: torch.Tensor):
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return block(x)
    finally:
        block.train(was_training)


def _container_takes_routing(experts: torch.nn.Module) -> bool:
    """The container has its own forward taking routing (Switch / NLLB style)."""
    fwd = type(experts).forward
    if fwd in (torch.nn.ModuleList.forward, torch.nn.ModuleDict.forward, torch.nn.Module.forward):
        return False
    try:
        return len(inspect.signature(fwd).parameters) >= 4
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- Switch / NLLB-MoE containers


def _switch_experts_forward(self, hidden_states, selected_experts, routing_weights):
    """Switch Transformers: ``selected_experts`` is a capacity-masked one-hot ``[T, 1, E]``."""
    mask = selected_experts.reshape(hidden_states.shape[0], -1)
    # Tokens over an expert's capacity are dropped (all-zero row): weight 0 gives the same zero output.
    kept = (mask.sum(-1, keepdim=True) > 0).to(hidden_states.dtype)
    idx = mask.argmax(-1, keepdim=True)
    w = routing_weights.reshape(-1, 1).to(hidden_states.dtype) * kept
    return run_expert_list(self, hidden_states, idx, w, len(_experts_list(self)))


def _nllb_experts_forward(self, hidden_states, router_mask, router_probs):
    """NLLB-MoE: ``router_mask`` holds top-2 expert ids ``[T, 2]``; eval scales by (1 - token dropout)."""
    if self.training and self.moe_token_dropout > 0:
        # transformers drops tokens per (token, expert) slot while training: keep its own forward.
        return type(self).forward(self, hidden_states, router_mask, router_probs)
    out = run_expert_list(
        self, hidden_states, router_mask, router_probs.to(hidden_states.dtype), len(_experts_list(self))
    )
    return out * (1 - self.moe_token_dropout) if self.moe_token_dropout > 0 else out


class RoutedListFamily(ExpertListOffload):
    """Expert lists called by their block with routing (Switch Transformers, NLLB-MoE)."""

    name = "routed_list"
    routing_reader = "capacity"

    def match(self, block, name, experts) -> bool:
        return _is_mlp_list(experts) and _container_takes_routing(experts)

    def num_experts(self, experts) -> int:
        return len(_experts_list(experts))

    def sizes(self, experts) -> tuple[int, int]:
        return _sizes(experts)

    def layout(self, experts) -> ExpertLayout:
        return ModuleListFamily.layout(self, experts)  # same storage description

    def install(self, handle: BlockHandle, options: PatchOptions) -> str | None:
        experts = handle.experts
        src = inspect.getsource(type(experts).forward)
        if "moe_token_dropout" in src:
            fwd = _nllb_experts_forward
        elif "permute(2, 1, 0)" in src and "one_hot" not in src:
            fwd = _switch_experts_forward
        else:
            return f"unknown routed expert-list call convention in {type(experts).__name__}.forward"
        set_attrs(
            experts,
            **{
                NAME_ATTR: handle.info.experts_path,
                VALIDATE_ATTR: options.validate,
                PACK_ATTR: _PackSlot(repack(experts)),
            },
        )
        bind_forward(experts, fwd)
        return None
