"""Install the offload engine on a live model and take it off again (the only mutation in this package).

:func:`attach_offload` replaces every routed expert tensor of the model by an empty placeholder,
routes the experts' forward through :class:`~moe_patch.offload.engine.OffloadEngine`, and adds
forward hooks on the model that time prefill and decode. :meth:`OffloadHandle.detach` undoes all
of it and puts the expert weights back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..cpu_attention import restore_cpu_attention, use_cpu_attention
from ..dense_linears import install_dense_linears
from ..detect.config import read_raw_config
from ..errors import MoEConfigError
from ..families.records import changed_modules, restore
from ..formats import read_quantization_config
from ..io import Checkpoint
from ..io.direct import page_cache_room, use_direct_reads
from .auto_budget import auto_expert_cache
from .engine import OffloadEngine
from .keymap import CheckpointMap
from .layers import OffloadLayer, find_offload_layers
from .options import OffloadOptions
from .plan import make_plan
from .runner import LayerRunner
from .sources import CheckpointSource, MemorySource
from .stats import OffloadStats, read_proc_io

logger = logging.getLogger(__name__)
_ATTR = "_moe_offload"  # on the model: its OffloadHandle


@dataclass
class OffloadHandle:
    """What :func:`attach_offload` installed; ``detach()`` removes it. ``stats`` is live."""

    model: nn.Module
    engine: OffloadEngine
    layers: list[OffloadLayer]
    options: OffloadOptions
    _originals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)
    _bound: list[nn.Module] = field(default_factory=list, repr=False)  # modules the families' installs changed
    attached: bool = True

    @property
    def stats(self) -> OffloadStats:
        return self.engine.stats

    def reset_stats(self) -> None:
        """Zero the counters (e.g. after a warm-up run); the caches keep their content."""
        self.engine.stats.reset()

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
            restored = (
                {
                    layer.index: {n: v.to(_placeholder_device(layer)) for n, v in self._weights_of(layer).items()}
                    for layer in self.layers
                }
                if restore_weights
                else {}
            )
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            for mod in self._bound:
                restore(mod)
            self._bound.clear()
            restore_cpu_attention(self.model)
            for layer in self.layers:
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
        for n in layer.param_names:
            if layer.expert_param_path(0, n) is None:
                out[n] = layer.stack(n, [w[n] for w in per_expert])
            else:
                out.update({layer.expert_param_path(e, n): w[n] for e, w in enumerate(per_expert)})
        return out


def _placeholder_device(layer: OffloadLayer) -> torch.device:
    p = next(iter(layer.experts.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _set_param(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    mod_path, _, name = dotted.rpartition(".")
    mod = root.get_submodule(mod_path) if mod_path else root
    old = mod._parameters.get(name)
    requires_grad = bool(old is not None and old.requires_grad and value.is_floating_point())
    mod._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)


def _tokens(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    return int(x.shape[0]), int(x.shape[1])


def _has_cached_tokens(kwargs: dict) -> bool:
    """Whether this forward continues a sequence: a KV cache holding tokens (transformers' ``Cache``, passed as
    ``past_key_values`` up to 5.23 and as ``cache`` since 5.25), else positions past the first."""
    for value in kwargs.values():
        if hasattr(value, "get_seq_length"):
            return int(value.get_seq_length()) > 0
    for name in ("cache_position", "position_ids"):  # only without a cache object: a host read of one position
        positions = kwargs.get(name)
        if isinstance(positions, torch.Tensor) and positions.numel():
            return int(positions.reshape(-1)[0]) > 0
    return False


def _memory_to_come(
    model: nn.Module, layers: list[OffloadLayer], opts: OffloadOptions, device: torch.device, expert_bytes: int
) -> int:
    """Host memory this run will take beyond what it holds now: the host cache, the expert slots on a CPU (all of
    the experts without a budget) and the non-expert weights not loaded yet (still on the meta device)."""
    slots = 0
    if device.type == "cpu":
        slots = expert_bytes if opts.expert_cache_bytes is None else min(expert_bytes, opts.expert_cache_bytes)
    experts = {id(m) for layer in layers for m in layer.experts.modules()}
    pending = sum(
        p.numel() * p.element_size()
        for m in model.modules()
        if id(m) not in experts
        for p in m.parameters(recurse=False)
        if p.is_meta
    )
    return (opts.host_cache_bytes or 0) + slots + pending


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
    layers = find_offload_layers(model, handles)
    device = opts.torch_device

    originals: dict[int, dict[str, torch.Tensor]] = {}
    if checkpoint_map is None and opts.checkpoint is not None:  # the folder's own config says how it stores experts
        stored_as = read_quantization_config(read_raw_config(opts.checkpoint).get("quantization_config"))
        checkpoint_map = CheckpointMap(Checkpoint(opts.checkpoint), model, layers, stored_as)
    if checkpoint_map is not None:
        source = CheckpointSource(checkpoint_map)
    else:
        for layer in layers:
            params = {p: layer.experts.get_parameter(p) for p in layer.parameter_paths()}
            if any(t.is_meta for t in params.values()):
                raise MoEConfigError(
                    f"{layer.experts_path}: the experts are not loaded (meta tensors); pass "
                    "OffloadOptions(checkpoint=...) or use moe_patch.load_model()."
                )
            # host RAM is the bottom tier: experts of a model already on the GPU move out of it
            originals[layer.index] = {p: t.detach().cpu() for p, t in params.items()}
        source = MemorySource(layers, originals)
    files = sorted({e.file for e in checkpoint_map.checkpoint.entries.values()}) if checkpoint_map else None
    quantization = checkpoint_map.quantization.method if checkpoint_map and checkpoint_map.quantization else None
    if opts.auto_expert_cache:  # a byte budget from free memory, before anything is allocated
        chosen = auto_expert_cache(
            model, layers, device, host_cache=opts.host_cache_bytes, context_tokens=opts.context_tokens
        )
        opts = replace(opts, expert_cache=chosen.expert_cache)
    plan = make_plan(opts, layers, source, files, quantization)
    if checkpoint_map is not None:  # past the page cache when it could not keep the experts anyway
        expert_bytes = sum(source.nbytes(layer.index, 0) * layer.num_experts for layer in layers)
        room = page_cache_room()
        if room is not None:  # less what this run takes from the same memory once its caches fill
            room = max(0, room - _memory_to_come(model, layers, opts, device, expert_bytes))
        direct = use_direct_reads(opts.direct_io, expert_bytes, room)
        checkpoint_map.checkpoint.direct = direct
        if direct:
            logger.info("offload: experts are read past the page cache (O_DIRECT, direct_io=%s)", opts.direct_io)

    # the engine (and its pinned host pool) first: if that fails, the model is still untouched
    engine = OffloadEngine(layers, source, opts, plan)
    if checkpoint_map is not None:
        engine.stats.stored_format = checkpoint_map.stored_description()
        checkpoint = checkpoint_map.checkpoint
        engine.stats.direct_reads_of = lambda: checkpoint.direct
    for layer in layers:
        for p in layer.parameter_paths():
            _set_param(layer.experts, p, torch.empty(0, dtype=layer.dtype))
    if device.type == "cuda" and move_model:  # pragma: no cover - GPU only
        model.to(device)
    handle = OffloadHandle(model=model, engine=engine, layers=layers, options=opts, _originals=originals)
    before = {id(m) for m in changed_modules(model)}
    for layer in layers:
        layer.family.install_offload(layer.handle, LayerRunner(engine, layer.index), handle._hooks)
    # CPU-resident dense weights (a CPU-only run) decode through the kernels' GEMV where measured faster
    dense = 0
    if device.type == "cpu":
        experts = {id(m) for layer in layers for m in layer.experts.modules()}
        dense = install_dense_linears(model, exclude=experts, meta=True)  # load_model fills the weights next
    if dense:
        logger.info("%d dense linears decode through the CPU kernel GEMV", dense)
    if device.type == "cpu" and not any(p.is_meta for p in model.parameters()):  # load_model: once loaded
        use_cpu_attention(model)
    handle._bound = [m for m in changed_modules(model) if id(m) not in before]

    timing: dict[str, Any] = {}

    def model_pre(module, args, kwargs):
        engine.forget_checks()
        shape = _tokens(args, kwargs)
        timing["shape"] = shape
        if shape is not None:  # the first forward of a generation is its prefill, even of a one-token prompt
            engine.phase = "prefill" if shape[1] > 1 or not _has_cached_tokens(kwargs) else "decode"
        timing["t0"] = time.perf_counter()

    def model_post(module, args, kwargs, output):
        engine.backend.synchronize()
        engine.check_outputs()
        shape = timing.get("shape")
        if shape is None:
            return
        st, phase = engine.stats, engine.phase
        st.seconds[phase] += time.perf_counter() - timing["t0"]
        st.tokens[phase] += shape[0] * shape[1] if phase == "prefill" else shape[0]
        st.steps[phase] += 1

    engine.stats.non_expert_bytes = _non_expert_step_bytes(model)
    engine.stats.io_read_start = read_proc_io()
    handle._hooks.append(model.register_forward_pre_hook(model_pre, with_kwargs=True))
    handle._hooks.append(model.register_forward_hook(model_post, with_kwargs=True))
    model.__dict__[_ATTR] = handle
    return handle


def _embedding(model: nn.Module, getter: str) -> nn.Module | None:
    """The model's input/output embedding, None where it has none (a vision backbone raises instead)."""
    try:
        return getattr(model, getter)() if hasattr(model, getter) else None
    except NotImplementedError:
        return None


def _non_expert_step_bytes(model: nn.Module) -> int:
    """Bytes of resident weights a decode step reads: every parameter left after the experts became
    placeholders, except an input embedding table not shared with the output head (one row is read)."""
    embed, head = _embedding(model, "get_input_embeddings"), _embedding(model, "get_output_embeddings")
    skip = set()
    if embed is not None and getattr(embed, "weight", None) is not None:
        if head is None or getattr(head, "weight", None) is not embed.weight:
            skip.add(id(embed.weight))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def get_offload_handle(model: nn.Module) -> OffloadHandle | None:
    """The handle of an offloaded model (None if it is not offloaded)."""
    return getattr(model, _ATTR, None)
