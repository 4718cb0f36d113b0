"""``load_model``: build a transformers model whose routed experts stay in the checkpoint files.

The model is instantiated on the meta device exactly as ``from_pretrained`` does
(``get_init_context``), the non-expert tensors are read one by one with transformers' conversion
rules and assigned, tied weights and non-persistent buffers are finalised by transformers' own
methods, and the experts are left to the offload engine. Peak host memory is the non-expert
weights plus the cache budgets plus one expert in flight.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cpu_attention import use_cpu_attention
from ..detect.config import load_config
from ..errors import CheckpointError, InvalidArgumentError, MoEConfigError
from ..formats import read_quantization_config
from ..io import Checkpoint
from .attach import OffloadHandle, attach_offload
from .keymap import CheckpointMap
from .layers import find_offload_layers
from .options import OffloadOptions

logger = logging.getLogger(__name__)

_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None, token: Any = None) -> Path:
    """A local checkpoint folder as is; a Hub repo id through one snapshot download (safetensors only; offline,
    the Hugging Face cache). Anything else is refused naming what it is: a missing folder, a file (a GGUF file
    says so), a folder without config.json or without safetensors weights (pickle-only weights say so)."""
    p = Path(path_or_repo_id).expanduser()
    text = str(path_or_repo_id)
    if p.is_dir():
        check_checkpoint_folder(p)
        return p
    if p.exists():
        if p.suffix.lower() == ".gguf":
            raise CheckpointError(
                f"{text}: a GGUF file (llama.cpp's format), not a checkpoint folder; moe-patch runs "
                "Hugging Face checkpoints: give the folder with config.json and *.safetensors."
            )
        raise CheckpointError(f"{text}: a file, not a checkpoint directory (expected config.json and .safetensors).")
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text:
        raise CheckpointError(f"{text}: no such folder (a checkpoint folder holds config.json and *.safetensors).")
    from hub_scripts.api import make_api
    from hub_scripts.errors import HubError
    from hub_scripts.pull import pull

    try:
        # Experts are read from the shards in place, so every safetensors shard is needed; never *.bin.
        # One HfApi built now, so HF_ENDPOINT is read at call time (module-level helpers bind it at import).
        folder = pull(text, revision=revision, include=_DOWNLOAD_PATTERNS, api=make_api(token=token))
    except HubError as exc:
        raise CheckpointError(f"{text}: no folder of that name here, and as a Hub repo id: {exc}") from exc
    check_checkpoint_folder(folder)
    return folder


def check_checkpoint_folder(folder: Path) -> None:
    """Refuse a folder that cannot be a checkpoint, naming what it holds instead (before any file is parsed)."""
    if (folder / "config.json").is_file():
        if any(folder.glob("*.safetensors")):
            return
        pickles = sorted(f.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in folder.glob(pattern))
        if pickles:
            raise CheckpointError(
                f"{folder}: its weights are PyTorch pickle files ({pickles[0]}), which moe-patch does not read "
                "(loading a pickle can run code); save the model as safetensors (save_pretrained does by default)."
            )
        raise CheckpointError(f"{folder}: config.json but no *.safetensors weights; the checkpoint is incomplete.")
    ggufs = sorted(f.name for f in folder.glob("*.gguf"))
    if ggufs:
        raise CheckpointError(
            f"{folder}: holds GGUF files ({ggufs[0]}: llama.cpp's format) and no config.json; moe-patch runs Hugging "
            "Face checkpoints: give the folder of the original model (config.json and *.safetensors)."
        )
    raise CheckpointError(
        f"{folder}/config.json: not found; a checkpoint folder needs its config.json (and *.safetensors weights)."
    )


def _resolve_dtype(dtype: Any, config: Any) -> torch.dtype:
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InvalidArgumentError(
            f"dtype={dtype!r}: expected a floating torch dtype (float32, bfloat16, float16) or 'auto'."
        )
    dtype = resolved
    return dtype


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_path, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    if name in mod._parameters:
        old = mod._parameters[name]
        param = nn.Parameter(
            value, requires_grad=bool(old is not None and old.requires_grad and value.is_floating_point())
        )
        param._is_hf_initialized = True
        mod._parameters[name] = param
    else:
        value._is_hf_initialized = True
        mod._buffers[name] = value


def _keep_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """transformers' `_keep_in_fp32_modules(_strict)` rule, as `from_pretrained` applies it (e.g.
    DeepSeek-V3's e_score_correction_bias stays fp32 in a bf16 model: rounding it changes routing)."""
    import re

    plan = model._get_dtype_plan(dtype)
    if not plan:
        return
    rx = re.compile("|".join(re.escape(k) for k in plan))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype != torch.float32 and rx.search(name):
            _assign(model, name, torch.empty_like(t, dtype=torch.float32))


def load_model(
    path_or_repo_id: str | os.PathLike,
    device: str = "cpu",
    expert_cache: int | str | None = None,
    host_cache: int | str | None = 0,
    quantize_experts: str | None = None,
    prefetch: bool = True,
    *,
    model_class: type | None = None,
    options: OffloadOptions | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a MoE checkpoint with its routed experts paged from disk; returns an ordinary transformers model.

    Args:
        path_or_repo_id: a local safetensors checkpoint directory or a Hub repo id.
        device: ``"cpu"`` or ``"cuda"``: where non-expert weights live and everything is computed.
        expert_cache / host_cache: byte budgets (``"8GiB"`` or ints) of the device and host caches.
        quantize_experts: ``"nf4"`` / ``"int8"`` to keep experts quantized in the caches.
        prefetch: read the next layer's likely experts in the background.
        model_class: the model class (default: ``AutoModelForCausalLM``'s choice for the config).
        options: full :class:`OffloadOptions` (overrides the budget arguments above).
        **from_pretrained_kwargs: ``dtype`` (default ``"auto"``), ``revision``, ``token``,
            ``trust_remote_code`` (off unless given).

    The offload handle is ``moe_patch.offload.get_offload_handle(model)``; its ``stats`` hold the
    statistics and ``detach()`` restores a plain model.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.utils.generic import ContextManagers

    kwargs = dict(from_pretrained_kwargs)
    revision, token = kwargs.pop("revision", None), kwargs.pop("token", None)
    trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
    dtype_arg = kwargs.pop("dtype", kwargs.pop("torch_dtype", "auto"))
    for ignored in ("device_map", "low_cpu_mem_usage"):
        if kwargs.pop(ignored, None) is not None:
            logger.warning("load_model: %s is ignored; experts are placed by the offload engine.", ignored)
    if kwargs:
        raise MoEConfigError(f"load_model: unsupported arguments {sorted(kwargs)}.")
    directory = resolve_checkpoint(path_or_repo_id, revision, token)
    # the one config reader every entry point uses: malformed JSON, strict field errors and the MoE
    # field checks all become one-line errors naming the file and field
    config = load_config(directory, trust_remote_code=trust_remote_code)
    dtype = _resolve_dtype(dtype_arg, config)
    cls = model_class or _get_model_class(config, AutoModelForCausalLM._model_mapping)

    try:  # FP8 / MXFP4 / compressed-tensors experts stay in their stored bytes; anything else stops here
        quantization = read_quantization_config(getattr(config, "quantization_config", None))
    except MoEConfigError as exc:
        raise MoEConfigError(f"{directory}: {exc}") from exc
    checkpoint = Checkpoint(directory)  # headers of every shard checked here
    with ContextManagers(cls.get_init_context(dtype, False, False, None)):
        model = cls(config)
    _keep_fp32(model, dtype)
    layers = find_offload_layers(model)
    cmap = CheckpointMap(checkpoint, model, layers, quantization)  # every tensor mapped and shape-checked here
    missing = [k for k in cmap.missing if k not in model.all_tied_weights_keys]
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} model tensors have no checkpoint tensor, e.g. {missing[:3]}. "
            "The checkpoint is incomplete or does not match config.json."
        )
    opts = options or OffloadOptions(
        device=device,
        expert_cache=expert_cache,
        host_cache=host_cache,
        quantize_experts=quantize_experts,
        prefetch=prefetch,
    )
    opts.device = device if options is None else opts.device
    handle: OffloadHandle = attach_offload(model, layers, opts, checkpoint_map=cmap, move_model=False)
    try:
        for key, recipe in cmap.dense.items():
            value = cmap.reader.load(recipe, per_expert=False)
            if tuple(value.shape) != recipe.shape:  # transformers' dequantize ops are only checked here
                first = recipe.entries[0]
                raise CheckpointError(
                    f"{first.file}: tensor {first.key!r} gives {key!r} shape {list(value.shape)} but the config "
                    f"needs {list(recipe.shape)}. The checkpoint does not match config.json."
                )
            _assign(model, key, value)
        model._move_missing_keys_from_meta_to_device(set(), None, None, None)  # non-persistent buffers
        model._initialize_missing_keys(False)  # recomputes rotary buffers; loaded tensors are flagged
        model.tie_weights()
        meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if meta:
            raise CheckpointError(f"{directory}: tensors {meta[:3]} were not loaded (absent from the checkpoint).")
    except BaseException:
        handle.detach(restore_weights=False)
        raise
    model.eval()
    if opts.device == "cpu":  # checked against the family's own attention: needs the loaded weights
        use_cpu_attention(model)
    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except OSError:
        pass
    if opts.device != "cpu":  # pragma: no cover - GPU only
        model.to(opts.device)
        handle.options.device = opts.device
    return model
