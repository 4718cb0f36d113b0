"""Install the offload engine on a live model and take it off again (the only mutation in this package).

:func:`attach_offload` replaces every routed expert tensor of the model by an empty placeholder,
routes the experts' forward through :class:`~moe_patch.offload.engine.OffloadEngine`, and adds
forward hooks on the model that time prefill and decode. :meth:`OffloadHandle.detach` undoes all
of it and puts the expert weights back.
"""

from __future__ import annotations

import logging
import time
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..dispatch.core import dispatch_combine, plan_dispatch
from ..errors import MoEConfigError
from .budget import check_budget, parse_bytes
from .cache import POLICIES
from .checkpoint import Checkpoint
from .costmodel import calibrate
from .engine import EngineConfig, OffloadEngine
from .keymap import CheckpointMap
from .layers import OffloadLayer, find_offload_layers
from .options import OffloadOptions
from .quant import check_format, nbytes_of, quantize
from .sources import CheckpointSource, MemorySource
from .stats import OffloadStats

logger = logging.getLogger(__name__)
_ATTR = "_moe_offload"


@dataclass
class OffloadHandle:
    """What :func:`attach_offload` installed; ``detach()`` removes it. ``stats`` is live."""

    model: nn.Module
    engine: OffloadEngine
    layers: list[OffloadLayer]
    options: OffloadOptions
    _originals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)
    attached: bool = True

    @property
    def stats(self) -> OffloadStats:
        return self.engine.stats

    def reset_stats(self) -> None:
        """Zero the counters (e.g. after a warm-up run); the caches keep their content."""
        old = self.engine.stats
        self.engine.stats = OffloadStats(
            layers=[type(s)(s.num_experts) for s in old.layers], device=old.device,
            expert_bytes=old.expert_bytes, bandwidths=old.bandwidths,
        )

    @torch.no_grad()
    def quantization_error(self, input_ids: torch.Tensor) -> dict[str, float]:
        """Logits with the quantized cached experts against full-precision experts from the source.

        Returns max absolute error, that error relative to the largest reference logit, and the
        fraction of positions whose arg-max token agrees.
        """
        quantized = self.model(input_ids=input_ids).logits.float()
        self.engine.bypass_caches = True
        try:
            reference = self.model(input_ids=input_ids).logits.float()
        finally:
            self.engine.bypass_caches = False
        err = (quantized - reference).abs().max().item()
        return {
            "max_abs": err,
            "max_rel": err / max(reference.abs().max().item(), 1e-12),
            "top1_agreement": (quantized.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        }

    def detach(self, restore_weights: bool = True) -> None:
        """Remove the engine and hooks; put the expert weights back (read from the checkpoint if
        they came from one: that needs RAM for every expert). Idempotent."""
        if not self.attached:
            return
        try:
            # Read every expert back first: an I/O error then leaves the model offloaded and working.
            restored = {layer.index: {n: v.to(_placeholder_device(layer)) for n, v in self._weights_of(layer).items()}
                        for layer in self.layers} if restore_weights else {}
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            for layer in self.layers:
                for mod in _expert_modules(layer):
                    mod.__dict__.pop("forward", None)
                    mod.__dict__.pop(_ATTR, None)
                for name, value in restored.get(layer.index, {}).items():
                    _set_param(layer.experts, name, value)
            self.model.__dict__.pop(_ATTR, None)
            self.attached = False
        finally:
            if not self.attached:
                self.engine.close()

    def _weights_of(self, layer: OffloadLayer) -> dict[str, torch.Tensor]:
        if layer.index in self._originals:
            return self._originals[layer.index]
        src = self.engine.source
        out: dict[str, torch.Tensor] = {}
        per_expert = [src.read(layer.index, e) for e in range(layer.num_experts)]
        if layer.storage == "fused":
            for n in layer.param_names:
                out[n] = torch.stack([w[n] for w in per_expert])
        else:
            for e, w in enumerate(per_expert):
                out.update({f"{e}.{n}": t for n, t in w.items()})
        return out


def _expert_modules(layer: OffloadLayer) -> list[nn.Module]:
    return [layer.experts] if layer.storage == "fused" else list(layer.experts)


def _placeholder_device(layer: OffloadLayer) -> torch.device:
    p = next(iter(layer.experts.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _set_param(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    mod_path, _, name = dotted.rpartition(".")
    mod = root.get_submodule(mod_path) if mod_path else root
    old = mod._parameters.get(name)
    requires_grad = bool(old is not None and old.requires_grad and value.is_floating_point())
    mod._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)


def _param_paths(layer: OffloadLayer) -> list[str]:
    if layer.storage == "fused":
        return list(layer.param_names)
    return [f"{e}.{n}" for e in range(layer.num_experts) for n in layer.param_names]


def _offloaded_fused_forward(self, hidden_states, top_k_index, top_k_weights):
    engine, layer = getattr(self, _ATTR)
    from ..validation import check_routing  # local, as in dispatch.experts

    check_routing(self, top_k_index, top_k_weights)
    plan = plan_dispatch(top_k_index, self.num_experts)
    counts = [b - a for a, b in zip(plan.offsets[:-1], plan.offsets[1:])]  # host-side already: no sync
    engine.begin_layer(layer, hidden_states, plan.active, counts)
    try:
        return dispatch_combine(
            hidden_states, top_k_index, top_k_weights, self.num_experts,
            lambda e, x: engine.run_expert(layer, e, x), plan=plan, order=engine.compute_order(layer, plan.active),
        )
    finally:
        engine.end_layer(layer)


def _expert_size(layer: OffloadLayer, quant: str | None) -> int:
    if quant is None:
        return layer.expert_bytes
    return sum(nbytes_of(quantize(torch.zeros(s, dtype=layer.dtype), quant)) for s in layer.shapes.values())


def _tokens(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    return int(x.shape[0]), int(x.shape[1])


def attach_offload(
    model: nn.Module,
    handles: list[Any] | None = None,
    options: OffloadOptions | dict | None = None,
    *,
    checkpoint_map: CheckpointMap | None = None,
    move_model: bool = True,
) -> OffloadHandle:
    """Offload the routed experts of ``model`` (already loaded, or built by :func:`load_model`).

    Args:
        handles: MoE blocks from :func:`moe_patch.detect.find_moe_blocks` (found here if None).
        options: budgets, device, policy, quantization, prefetch (:class:`OffloadOptions`).
        checkpoint_map: an already validated map of the checkpoint (``load_model`` passes it).
        move_model: move the non-expert weights to ``options.device`` (``load_model`` does it itself).

    Budgets and the checkpoint are checked before anything is changed: on error the model is untouched.
    """
    opts = OffloadOptions.coerce(options or OffloadOptions())
    if getattr(model, _ATTR, None) is not None:
        raise MoEConfigError("this model is already offloaded; call .detach() on its handle first.")
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoEConfigError(f"device={opts.device!r} but CUDA is not available here; use device='cpu'.")
    if device.type not in ("cpu", "cuda"):
        raise MoEConfigError(f"device={opts.device!r}: offloading supports 'cpu' and 'cuda'.")
    if opts.policy not in POLICIES:
        raise MoEConfigError(f"policy={opts.policy!r}: choose one of {', '.join(POLICIES)}.")
    if opts.cpu_compute not in ("auto", "always", "never"):
        raise MoEConfigError(f"cpu_compute={opts.cpu_compute!r}: choose 'auto', 'always' or 'never'.")
    quant = check_format(opts.quantize_experts)
    layers = find_offload_layers(model, handles)
    expert_cache = parse_bytes(opts.expert_cache, name="expert_cache")
    host_cache = parse_bytes(opts.host_cache, name="host_cache")
    biggest = max(_expert_size(layer, quant) for layer in layers)
    check_budget(expert_cache, biggest, name="expert_cache", allow_zero=False)
    check_budget(host_cache, biggest, name="host_cache", allow_zero=True)

    originals: dict[int, dict[str, torch.Tensor]] = {}
    if checkpoint_map is None and opts.checkpoint is not None:
        checkpoint_map = CheckpointMap(Checkpoint(opts.checkpoint), model, layers)
    if checkpoint_map is not None:
        source = CheckpointSource(checkpoint_map)
    else:
        for layer in layers:
            params = {p: layer.experts.get_parameter(p) for p in _param_paths(layer)}
            if any(t.is_meta for t in params.values()):
                raise MoEConfigError(
                    f"{layer.experts_path}: the experts are not loaded (meta tensors); pass "
                    "OffloadOptions(checkpoint=...) or use moe_patch.load_model()."
                )
            # host RAM is the bottom tier: experts of a model already on the GPU move out of it
            originals[layer.index] = {p: t.detach().cpu() for p, t in params.items()}
        source = MemorySource(layers, originals)

    # the engine (and its pinned host pool) first: if that fails, the model is still untouched
    bandwidths = calibrate(str(device), layers[0].dtype) if opts.calibrate else None
    engine = OffloadEngine(
        layers, source,
        EngineConfig(
            device=device, expert_cache=expert_cache, host_cache=host_cache, policy=opts.policy,
            hot=tuple(tuple(k) for k in opts.hot_experts), quantize=quant, prefetch=opts.prefetch,
            cpu_compute=opts.cpu_compute, max_prefetch_per_layer=opts.max_prefetch_per_layer, bandwidths=bandwidths,
        ),
    )
    for layer in layers:
        for p in _param_paths(layer):
            _set_param(layer.experts, p, torch.empty(0, dtype=layer.dtype))
    if device.type == "cuda" and move_model:  # pragma: no cover - GPU only
        model.to(device)
    handle = OffloadHandle(model=model, engine=engine, layers=layers, options=opts, _originals=originals)
    for layer in layers:
        if layer.storage == "fused":
            setattr(layer.experts, _ATTR, (engine, layer.index))
            layer.experts.forward = types.MethodType(_offloaded_fused_forward, layer.experts)
        else:
            block = model.get_submodule(layer.path) if layer.path else model
            for e, mod in enumerate(layer.experts):
                mod.forward = (lambda x, *a, _l=layer.index, _e=e, **k: engine.run_expert(_l, _e, x))

            def pre(module, args, kwargs, _l=layer.index):
                hidden = args[0] if args else next(iter(kwargs.values()))
                engine.begin_layer(_l, hidden, None, None)

            handle._hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handle._hooks.append(block.register_forward_hook(lambda m, a, o, _l=layer.index: engine.end_layer(_l)))

    timing: dict[str, Any] = {}

    def model_pre(module, args, kwargs):
        shape = _tokens(args, kwargs)
        timing["shape"] = shape
        if shape is not None:
            engine.phase = "prefill" if shape[1] > 1 else "decode"
        timing["t0"] = time.perf_counter()

    def model_post(module, args, kwargs, output):
        if device.type == "cuda":  # pragma: no cover - GPU only
            torch.cuda.synchronize(device)
        shape = timing.get("shape")
        if shape is None:
            return
        st, phase = engine.stats, engine.phase
        st.seconds[phase] += time.perf_counter() - timing["t0"]
        st.tokens[phase] += shape[0] * shape[1] if phase == "prefill" else shape[0]
        st.steps[phase] += 1

    handle._hooks.append(model.register_forward_pre_hook(model_pre, with_kwargs=True))
    handle._hooks.append(model.register_forward_hook(model_post, with_kwargs=True))
    model.__dict__[_ATTR] = handle
    return handle


def get_offload_handle(model: nn.Module) -> OffloadHandle | None:
    """The handle of an offloaded model (None if it is not offloaded)."""
    return getattr(model, _ATTR, None)
