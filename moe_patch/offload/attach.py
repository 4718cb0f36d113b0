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

from ..errors import MoEConfigError
from ..io import Checkpoint
from .budget import check_budget, parse_bytes
from .cache import POLICIES
from .costmodel import calibrate, choose_compute_dtype, choose_device_format, measure_disk, time_stored_expert
from .engine import EngineConfig, OffloadEngine, encoded_nbytes
from ..families.records import changed_modules, restore
from .runner import LayerRunner
from .keymap import CheckpointMap
from .layers import OffloadLayer, find_offload_layers
from .options import DEVICE_FORMATS, OffloadOptions
from ..formats import cache_format
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
        old = self.engine.stats
        self.engine.stats = OffloadStats(
            layers=[type(s)(s.num_experts) for s in old.layers], device=old.device,
            expert_bytes=old.expert_bytes, bandwidths=old.bandwidths, stored_expert_bytes=old.stored_expert_bytes,
            device_format=old.device_format, stored_format=old.stored_format, non_expert_bytes=old.non_expert_bytes,
            compute_dtype=old.compute_dtype,
            io_read_start=read_proc_io(),
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
            for mod in self._bound:
                restore(mod)
            self._bound.clear()
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


def _quantized_size(layer: OffloadLayer, quant: str) -> int:
    return encoded_nbytes(layer, quant)


def _host_bytes(layer: OffloadLayer, source: Any, quant: str | None) -> int:
    """Bytes one expert takes in the host tier: quantized, stored (quantized checkpoints) or model dtype."""
    if quant is not None:
        return _quantized_size(layer, quant)
    if getattr(source, "stored", False):
        return source.nbytes(layer.index, 0)
    return layer.expert_bytes


def _device_format(opts: OffloadOptions, source: Any, layers: list[OffloadLayer], expert_cache: int | None,
                   host_cache: int | None, device: torch.device, bandwidths: Any) -> str:
    """How the device cache keeps experts of a quantized checkpoint (the cost model's choice for "auto")."""
    if not getattr(source, "stored", False):
        return "dequantized"  # nothing to decode: the stored bytes are the model's
    if opts.device_format != "auto":
        return opts.device_format
    n = sum(layer.num_experts for layer in layers)
    stored = max(source.nbytes(layer.index, 0) for layer in layers)
    decoded = max(layer.expert_bytes for layer in layers)
    if expert_cache is None or expert_cache >= n * decoded:
        return "dequantized"
    if bandwidths is None or expert_cache < decoded:  # not calibrated, or no decoded expert fits: capacity
        return "stored"
    read_s, decode_s = time_stored_expert(source, layers[0].index, device)
    if host_cache:  # misses come from the host tier: a PCIe copy on CUDA, nothing beyond the decode on CPU
        miss_s = stored / bandwidths.h2d if device.type == "cuda" and bandwidths.h2d else 0.0
    else:
        miss_s = read_s
    choice = choose_device_format(expert_cache, n, stored, decoded, decode_s, miss_s)
    logger.info("device cache keeps experts %s (decode %.2f ms, miss %.2f ms per expert)", choice, 1e3 * decode_s,
                1e3 * miss_s)
    return choice


def _compute_dtype(opts: OffloadOptions, source: Any, layers: list[OffloadLayer], expert_cache: int | None,
                   host_cache: int | None, device: torch.device, quant: str | None,
                   disk_bw: float) -> torch.dtype | None:
    """On a CPU, the dtype the slots keep half-precision experts in (None: the model's): fp32 where this
    machine's fp32 GEMV beats its bf16/fp16 one by more than the capacity it costs (measured)."""
    dtype = layers[0].dtype
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or quant or not opts.calibrate:
        return None
    if getattr(source, "stored", False) and opts.device_format == "stored":
        return None
    half_bw, fp32_bw = calibrate("cpu", dtype), calibrate("cpu", torch.float32)
    half_bytes = max(layer.expert_bytes for layer in layers)
    n = sum(layer.num_experts for layer in layers)
    half_s = half_bytes / (half_bw.cpu_gemv or half_bw.dram)
    fp32_s = 2 * half_bytes / (fp32_bw.cpu_gemv or fp32_bw.dram)
    stored = max(_host_bytes(layer, source, None) for layer in layers)
    # a miss comes from the host tier (RAM) when there is one, else from the checkpoint's storage
    miss_s = stored / (disk_bw if not host_cache and disk_bw > 0 else fp32_bw.dram)
    choice = choose_compute_dtype(expert_cache, n, half_bytes, half_s, fp32_s, miss_s)
    logger.info("CPU experts computed in %s (GEMV per expert: %.2f ms %s, %.2f ms float32)",
                "float32" if choice == "fp32" else dtype, 1e3 * half_s, dtype, 1e3 * fp32_s)
    return torch.float32 if choice == "fp32" else None


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
    try:
        device = torch.device(opts.device)
    except (RuntimeError, TypeError) as exc:
        raise MoEConfigError(f"device={opts.device!r}: not a device name; use 'cpu', 'cuda' or 'cuda:N'.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoEConfigError(f"device={opts.device!r} but CUDA is not available here; use device='cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()  # pragma: no cover - needs a GPU
        raise MoEConfigError(f"device={opts.device!r} but this machine has {n} CUDA device{'s' * (n != 1)} "
                             f"(cuda:0 to cuda:{n - 1}).")
    if device.type not in ("cpu", "cuda"):
        raise MoEConfigError(f"device={opts.device!r}: offloading supports 'cpu' and 'cuda'.")
    if opts.policy not in POLICIES:
        raise MoEConfigError(f"policy={opts.policy!r}: choose one of {', '.join(POLICIES)}.")
    if opts.cpu_compute not in ("auto", "always", "never"):
        raise MoEConfigError(f"cpu_compute={opts.cpu_compute!r}: choose 'auto', 'always' or 'never'.")
    if opts.device_format not in DEVICE_FORMATS:
        raise MoEConfigError(f"device_format={opts.device_format!r}: choose one of {', '.join(DEVICE_FORMATS)}.")
    fmt = cache_format(opts.quantize_experts)
    quant = fmt.name if fmt is not None else None
    layers = find_offload_layers(model, handles)
    expert_cache = parse_bytes(opts.expert_cache, name="expert_cache")
    host_cache = parse_bytes(opts.host_cache, name="host_cache")

    originals: dict[int, dict[str, torch.Tensor]] = {}
    if checkpoint_map is None and opts.checkpoint is not None:
        checkpoint_map = CheckpointMap(Checkpoint(opts.checkpoint), model, layers)
    if checkpoint_map is not None:
        source = CheckpointSource(checkpoint_map)
        if quant is not None and checkpoint_map.quantization is not None:
            raise MoEConfigError(
                f"quantize_experts={quant!r}: this checkpoint's experts are already quantized "
                f"({checkpoint_map.quantization.method}) and are kept in their stored bytes; drop quantize_experts."
            )
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

    bandwidths = calibrate(str(device), layers[0].dtype) if opts.calibrate else None
    if bandwidths is not None and checkpoint_map is not None:  # the storage's own speed, measured cold
        files = sorted({e.file for e in checkpoint_map.checkpoint.entries.values()})
        bandwidths = replace(bandwidths, disk=measure_disk(files))
    device_format = _device_format(opts, source, layers, expert_cache, host_cache, device, bandwidths)
    compute_dtype = _compute_dtype(opts, source, layers, expert_cache, host_cache, device, quant,
                                   bandwidths.disk if bandwidths is not None else 0.0)
    host_bytes = max(_host_bytes(layer, source, quant) for layer in layers)
    device_bytes = max(layer.expert_bytes for layer in layers) if device_format == "dequantized" and \
        getattr(source, "stored", False) else host_bytes
    if compute_dtype is not None:
        device_bytes = max(layer.expert_bytes for layer in layers) * 4 // layers[0].dtype.itemsize
    check_budget(expert_cache, device_bytes, name="expert_cache", allow_zero=False)
    check_budget(host_cache, host_bytes, name="host_cache", allow_zero=True)

    # the engine (and its pinned host pool) first: if that fails, the model is still untouched
    engine = OffloadEngine(
        layers, source,
        EngineConfig(
            device=device, expert_cache=expert_cache, host_cache=host_cache, policy=opts.policy,
            hot=tuple(tuple(k) for k in opts.hot_experts), quantize=quant, prefetch=opts.prefetch,
            cpu_compute=opts.cpu_compute, max_prefetch_per_layer=opts.max_prefetch_per_layer, bandwidths=bandwidths,
            device_format=device_format, compute_dtype=compute_dtype,
        ),
    )
    if checkpoint_map is not None:
        engine.stats.stored_format = checkpoint_map.stored_description()
    for layer in layers:
        for p in layer.parameter_paths():
            _set_param(layer.experts, p, torch.empty(0, dtype=layer.dtype))
    if device.type == "cuda" and move_model:  # pragma: no cover - GPU only
        model.to(device)
    handle = OffloadHandle(model=model, engine=engine, layers=layers, options=opts, _originals=originals)
    before = {id(m) for m in changed_modules(model)}
    for layer in layers:
        layer.family.install_offload(layer.handle, LayerRunner(engine, layer.index), handle._hooks)
    handle._bound = [m for m in changed_modules(model) if id(m) not in before]

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
