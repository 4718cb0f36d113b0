"""Tiny random-weight models of every MoE family of the installed transformers.

Used by the tests, the demo and the benchmarks: nothing is downloaded, every model is built from
its family's config class with small sizes (hidden 64, 2 layers, 8 experts, top-2, vocab 128).

Public API::

    discover_moe_families() -> list[str]          # model types, read from transformers' sources
    tiny_config(model_type, **overrides)          # a small PretrainedConfig of that family
    tiny_model(model_type, dtype, seed)           # (model in eval mode, example forward kwargs)
    main_output(outputs)                          # the tensor to compare (logits, else hidden states)

How a config is made small: the family's default config is turned into a dict, every known size
field is clamped by :data:`_SIZES` (recursively, sub-configs such as ``text_config`` included),
identities of the full config are kept (MLA: as many KV heads as heads), per-layer settings keep the
two layers that cover the most distinct settings (so "3 dense layers then MoE" keeps a dense and an
MoE layer, a hybrid keeps one attention and one linear-attention layer), token ids are moved inside
the small vocabulary, then the family's entry in :data:`_FAMILY_OVERRIDES` (if any) is applied and
the config is rebuilt by its own class (so its validation runs). Keyword overrides given to
:func:`tiny_config` / :func:`tiny_model` win over all.

A new MoE family usually works with the generic shrinker alone; when it does not, add a
:class:`TinySpec` for it with a comment saying why.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .discover import MoEFamily, discover_moe_families, moe_family_info

__all__ = ["TinySpec", "discover_moe_families", "main_output", "tiny_config", "tiny_model"]

VOCAB = 128
HIDDEN = 64
EXPERTS = 8
TOP_K = 2
BATCH, SEQ = 2, 8

# field name -> the small value. A field is only ever made smaller (min), except where the value
# is a callable of the old value.
_SIZES: dict[str, Any] = {
    # widths
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "n_embd": HIDDEN,
    "embed_dim": HIDDEN,
    "text_hidden_size": HIDDEN,
    "thinker_hidden_size": HIDDEN,
    "out_hidden_size": HIDDEN,
    "projector_hidden_size": HIDDEN,
    "projection_hidden_dim": HIDDEN,
    "merged_hidden_size": HIDDEN,
    "vision_output_dim": HIDDEN,
    "output_dim": HIDDEN,
    "projector_input_dim": HIDDEN,
    "projector_output_dim": HIDDEN,
    "router_hidden_size": HIDDEN,
    "adapter_in_dim": HIDDEN,
    "adapter_out_dim": HIDDEN,
    "adapter_input_size": HIDDEN,
    "intermediate_size": HIDDEN,
    "d_ff": HIDDEN,
    "ffn_hidden_size": HIDDEN,
    "dense_intermediate_size": HIDDEN,
    "intermediate_size_mlp": HIDDEN,
    "encoder_ffn_dim": HIDDEN,
    "decoder_ffn_dim": HIDDEN,
    "mlp_dim": HIDDEN,
    "projection_intermediate_size": HIDDEN,
    "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "moe_hidden_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "share_expert_dim": 32,
    "vocab_size": VOCAB,
    # depth
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "depth": 2,
    # attention
    "num_attention_heads": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "kv_n_heads": 2,
    "head_dim": 16,
    "d_kv": 16,
    "kv_channels": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "num_sliding_attention_heads": 4,
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "o_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "qk_head_dim": 32,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_num_heads": 2,
    "max_position_embeddings": 512,
    "max_seq_len": 512,
    "sliding_window": 64,
    "sliding_window_size": 64,
    "attention_chunk_size": 64,
    "max_window_layers": 2,
    # linear attention / state space
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "mamba_n_heads": 8,
    "mamba_num_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "mamba_chunk_size": 16,
    "chunk_size": 16,
    "mamba_dt_rank": 8,
    # experts: any real MoE count becomes EXPERTS, top-k becomes TOP_K (never raised)
    "num_experts": lambda v: EXPERTS if v and v > 1 else v,
    "num_local_experts": lambda v: EXPERTS if v and v > 1 else v,
    "n_routed_experts": lambda v: EXPERTS if v and v > 1 else v,
    "moe_num_experts": lambda v: EXPERTS if isinstance(v, int) and v > 1 else v,
    "num_experts_per_tok": TOP_K,
    "num_experts_per_token": TOP_K,
    "moe_k": TOP_K,
    "moe_top_k": TOP_K,
    "moe_topk": TOP_K,
    "top_k": TOP_K,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "n_group": lambda v: 2 if v and v > 1 else v,
    "num_expert_group": lambda v: 2 if v and v > 1 else v,
    "topk_group": 1,
    "zero_expert_num": 4,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "decoder_sparse_step": 1,
    "encoder_sparse_step": 1,
    "interleave_moe_layer_step": 1,
    "moe_layer_interval": 1,
    # vision / audio towers (text-only inputs are used, the towers only need to build cheaply)
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "canvas_length": SEQ,
    "image_size": 64,
    "num_mel_bins": 16,
    "n_mel_bins": 16,
    "num_position_embeddings": 64,
}

# Fields some families leave None in their default config (a dense default): give them MoE values.
_WHEN_NONE: dict[str, Any] = {
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "top_k_experts": TOP_K,
    "moe_intermediate_size": 32,
}

# (lead, follower): when equal in the default config, the follower stays equal to the lead.
_KEEP_EQUAL = (
    ("num_attention_heads", "num_key_value_heads"),
    ("swa_num_attention_heads", "swa_num_key_value_heads"),
    ("qk_rope_head_dim", "head_dim"),
)

# Config dict fields that hold token ids (moved inside the small vocabulary).
_TOKEN_ID = re.compile(r"(token_id|token_index|_id)$")
_DEPTH_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "decoder_layers", "depth")
# Lists of layer indices (filtered to the new depth) rather than per-layer lists.
_INDEX_LISTS = {
    "mlp_only_layers",
    "moe_layers",
    "global_attn_indexes",
    "deepstack_visual_indexes",
    "out_indices",
    "fullatt_block_indexes",
    "index_layers",
}
# per-layer lists whose values are layer indices (kolibri1_1: the layer whose K/V each layer reads)
_LAYER_REFERENCE_LISTS = {"kv_source_layers"}


@dataclass
class TinySpec:
    """Per-family knobs where the generic shrinker is not enough.

    Attributes:
        config: dict merged into the shrunk config dict (nested dicts merge into sub-configs).
        model_class: class name in the family's modeling module to instantiate (default: picked
            from transformers' auto mappings: causal LM, image-text-to-text, seq2seq, base model).
        submodel: config attribute to build the model from (``"thinker_config"`` for Qwen3-Omni).
        inputs: extra forward kwargs builder ``f(config, generator) -> dict``.
    """

    config: dict[str, Any] = field(default_factory=dict)
    model_class: str | None = None
    submodel: str | None = None
    inputs: Callable[[Any, torch.Generator], dict[str, Any]] | None = None


def _vitpose_inputs(config, gen):
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    return {
        "pixel_values": torch.randn(BATCH, config.num_channels, *size, generator=gen),
        "dataset_index": torch.arange(BATCH) % config.num_experts,
    }


_FAMILY_OVERRIDES: dict[str, TinySpec] = {
    # Dataset-indexed experts (one per pose dataset), off (1 expert) by default.
    "vitpose_backbone": TinySpec(
        config={
            "num_experts": 4,
            "image_size": [32, 32],
            "patch_size": [8, 8],
            "part_features": 16,
            "out_features": ["stage2"],
            "out_indices": [2],
        },
        inputs=_vitpose_inputs,
    ),
    # Defaults that do not build as they are (None where the model multiplies or indexes).
    "dots1": TinySpec(config={"n_shared_experts": 1}),
    # Product-key experts: num_experts must be a square (sqrt(num_experts) keys per side).
    "doge": TinySpec(config={"num_experts": 16}),
    "gemma4": TinySpec(config={"text_config": {"enable_moe_block": True}}),
    # Its default is dense (1 expert, top-1).
    "hunyuan_v1_moe": TinySpec(config={"head_dim": 16, "num_experts": EXPERTS, "moe_topk": TOP_K}),
    "deepseek_ocr2": TinySpec(config={"text_config": {"mlp_layer_types": ["dense", "sparse"]}}),
    # Layer patterns left None / uniform by default, or derived from periods: one of each kind.
    "lfm2_moe": TinySpec(config={"layer_types": ["conv", "full_attention"], "num_dense_layers": 1}),
    "granitemoehybrid": TinySpec(config={"layer_types": ["linear_attention", "full_attention"]}),
    "jamba": TinySpec(
        config={"expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 0}
    ),
    "step3p7": TinySpec(config={"text_config": {"sliding_window": 64}}),
    # Its "indexed_attention" layers need the (default None) QSA indexer sizes.
    "qwen4_exp": TinySpec(
        config={
            "text_config": {
                "indexer_n_heads": 2,
                "indexer_kv_heads": 1,
                "indexer_head_dim": 16,
                "indexer_budget": 8,
                "indexer_compress_ratio": 4,
            }
        }
    ),
    # transformers 5.23's DbrxConfig() lacks attn_config.rope_theta that the model reads (real
    # checkpoints carry it), and clamps with clip_qkv unconditionally (DBRX ships 8.0).
    "dbrx": TinySpec(config={"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}}),
    # Sliding layers take head_dim = their per-layer qk_nope_head_dim + qk_rope_head_dim.
    "dots3_note": TinySpec(config={"text_config": {"head_dim": 32}}),
    # The thinker is the language model (the talker speaks); text-only input_ids go to it.
    "qwen3_omni_moe": TinySpec(model_class="Qwen3OmniMoeThinkerForConditionalGeneration", submodel="thinker_config"),
    # Vision patch planning needs n_layers >= its scale count, else it calls scipy.
    "inkling_mm_model": TinySpec(config={"vision_config": {"n_layers": 4, "patch_size": 4}}),
    # Per-layer KV-cache owners are layer indices: each kept layer owns its own.
    "mistral_large4": TinySpec(config={"text_config": {"kv_source_layers": [0, 1]}}),
    # M-RoPE sections that live in the modeling code, not in rope_parameters (sum = rotary dim / 2).
    "glm4v_moe": TinySpec(config={"text_config": {"rope_parameters": {"mrope_section": [1, 1, 2]}}}),
    "ernie4_5_vl_moe": TinySpec(config={"text_config": {"rope_parameters": {"mrope_section": [3, 3, 2]}}}),
}


# ---------------------------------------------------------------------------------------------
# config


def _is_subconfig(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _clamp(key: str, value: Any) -> Any:
    if value is None and key in _WHEN_NONE:
        return _WHEN_NONE[key]
    if key in _SIZES and isinstance(value, int) and not isinstance(value, bool):
        rule = _SIZES[key]
        return rule(value) if callable(rule) else min(value, rule)
    if key in _SIZES and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [_clamp(key, v) for v in value]  # e.g. Ernie-VL's per-modality moe_intermediate_size
    return value


def _per_layer_entries(d: dict[str, Any], depth: int) -> dict[str, list[Any]]:
    """Every field of ``d`` that says something per layer, as a list of length ``depth``."""
    out: dict[str, list[Any]] = {}
    for key, value in d.items():
        if key in _LAYER_REFERENCE_LISTS:
            continue  # not a setting: remapped with the layers kept (_shrink_layers)
        if key in _INDEX_LISTS and isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[key] = [i in value for i in range(depth)]
        elif isinstance(value, list) and len(value) == depth and not key.endswith(("_id", "_ids")):
            out[key] = [repr(v) for v in value]
        elif "layer" in key and _is_layer_dict(value):
            out[key] = [repr(value.get(k)) for k in _layer_keys(value, depth)]
    return out


def _is_layer_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(str(k).isdigit() for k in value)


def _layer_keys(value: dict[str, Any], depth: int) -> list[str]:
    width = len(str(next(iter(value))))
    return [f"{i:0{width}d}" for i in range(depth)]


def _pick_layers(entries: dict[str, list[Any]], old: int, new: int) -> list[int]:
    """``new`` layer indices out of ``old`` that cover the most distinct per-layer settings.

    Greedy: layer 0, then each time the layer adding the most unseen ``(field, value)`` pairs. Cut
    to 2 layers, a "3 dense layers then MoE" model keeps a dense and an MoE layer, a hybrid keeps
    one attention and one linear-attention layer.
    """
    chosen = [0]
    seen = {(key, vals[0]) for key, vals in entries.items()}
    while len(chosen) < new:
        best, gain = None, -1
        for i in range(old):
            if i in chosen:
                continue
            g = len({(key, vals[i]) for key, vals in entries.items()} - seen)
            if g > gain:
                best, gain = i, g
        chosen.append(best)
        seen |= {(key, vals[best]) for key, vals in entries.items()}
    return sorted(chosen)


def _shrink_layers(d: dict[str, Any], old: int, new: int) -> None:
    entries = _per_layer_entries(d, old)
    keep = _pick_layers(entries, old, new)
    for key in _LAYER_REFERENCE_LISTS & d.keys():
        value = d[key]
        if isinstance(value, list) and len(value) == old:  # a reference to a layer left out: the layer's own
            d[key] = [keep.index(value[i]) if value[i] in keep else j for j, i in enumerate(keep)]
    for key in entries:
        value = d[key]
        if key in _INDEX_LISTS:
            d[key] = [j for j, i in enumerate(keep) if i in value]
        elif isinstance(value, list):
            d[key] = [value[i] for i in keep]
        else:
            old_keys = _layer_keys(value, old)
            new_keys = _layer_keys(value, new)
            d[key] = {new_keys[j]: _clamp_layer(value[old_keys[i]]) for j, i in enumerate(keep) if old_keys[i] in value}


def _clamp_layer(overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: _clamp(k, v) for k, v in overrides.items()}
    _keep_identities(overrides, out)
    return out


def _rescale_rope(rope: Any, rotary_half: int) -> Any:
    """M-RoPE sections must sum to half the rotary dimension: rescale them to the new one."""
    if not isinstance(rope, dict):
        return rope
    rope = {k: _rescale_rope(v, rotary_half) for k, v in rope.items()}
    section = rope.get("mrope_section")
    if isinstance(section, list) and section and sum(section) != rotary_half:
        total = sum(section)
        scaled = [max(1, v * rotary_half // total) for v in section]
        scaled[0] += rotary_half - sum(scaled)
        rope["mrope_section"] = scaled
    return rope


def _keep_identities(base: dict[str, Any], d: dict[str, Any]) -> None:
    """Multi-head latent attention has as many KV heads as query heads, its head_dim is
    qk_rope_head_dim or qk_nope + qk_rope, ...: keep such identities of the full-size config."""
    for lead, follower in _KEEP_EQUAL:
        if base.get(lead) is not None and base.get(lead) == base.get(follower):
            d[follower] = d[lead]
    nope, rope = base.get("qk_nope_head_dim"), base.get("qk_rope_head_dim")
    if isinstance(nope, int) and isinstance(rope, int):
        for key in ("head_dim", "qk_head_dim"):
            if base.get(key) == nope + rope:
                d[key] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]


def _shrink_dict(d: dict[str, Any], token_ids: dict[int, int]) -> dict[str, Any]:
    base, d = d, dict(d)
    old_depth = next((d[k] for k in _DEPTH_KEYS if isinstance(d.get(k), int)), None)
    for key, value in list(d.items()):
        d[key] = _shrink_dict(value, token_ids) if _is_subconfig(value) else _clamp(key, value)
    _keep_identities(base, d)
    new_depth = next((d[k] for k in _DEPTH_KEYS if isinstance(d.get(k), int)), None)
    if old_depth and new_depth and new_depth < old_depth:
        _shrink_layers(d, old_depth, new_depth)
    if isinstance(d.get("rope_parameters"), dict) and isinstance(d.get("hidden_size"), int):
        heads = d.get("num_attention_heads") or 1
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        factor = d["rope_parameters"].get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0
        d["rope_parameters"] = _rescale_rope(d["rope_parameters"], int(head_dim * factor) // 2)
    for key, value in list(d.items()):
        if _TOKEN_ID.search(key) and not isinstance(value, bool):
            d[key] = _remap_ids(value, token_ids)
    return d


def _remap_ids(value: Any, token_ids: dict[int, int]) -> Any:
    if isinstance(value, list):
        return [_remap_ids(v, token_ids) for v in value]
    if isinstance(value, int) and value >= VOCAB - 32:
        # Special ids live at the top of the small vocabulary, one slot per distinct original id.
        if value not in token_ids:
            token_ids[value] = VOCAB - 1 - len(token_ids)
        return token_ids[value]
    return value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _canonical(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Config keys as stored: aliases of ``attribute_map`` (``num_experts`` -> ``num_local_experts``
    for Qwen3-MoE) resolved, for sub-configs too."""
    aliases = getattr(cls, "attribute_map", {}) or {}
    subs = getattr(cls, "sub_configs", {}) or {}
    out = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in subs and isinstance(subs[key], type):
            value = _canonical(subs[key], value)
        out[aliases.get(key, key)] = value
    return out


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def tiny_config(model_type: str, **overrides: Any):
    """A small config of the family ``model_type`` (hidden 64, 2 layers, 8 experts, top-2, vocab 128).

    ``overrides`` are merged last (nested dicts merge into sub-configs, e.g.
    ``text_config={"num_experts": 4}``).
    """
    cls = _config_class(model_type)
    base = cls().to_dict()
    small = _shrink_dict(base, {})
    spec = _FAMILY_OVERRIDES.get(model_type, TinySpec())
    small = _merge(small, _canonical(cls, spec.config))
    small = _merge(small, _canonical(cls, overrides))
    for key in ("transformers_version", "_name_or_path", "architectures"):
        small.pop(key, None)
    return cls.from_dict(small)


# ---------------------------------------------------------------------------------------------
# model

_CLASS_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES",
)


def _model_class(family: MoEFamily, spec: TinySpec):
    module = importlib.import_module(f"transformers.models.{family.module}")
    if spec.model_class:
        return getattr(module, spec.model_class)
    from transformers.models.auto import modeling_auto

    for mapping_name in _CLASS_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, {})
        name = mapping.get(family.model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        if name:
            # a config-only family (transformers 5.25's sarvam_moe, param2moe) maps to another family's class
            return getattr(module, name, None) or getattr(importlib.import_module("transformers"), name)
    raise LookupError(f"no model class for MoE family {family.model_type!r}: add a TinySpec.model_class")


def _config_for(cls: type, config: Any) -> Any:
    """The config ``cls`` takes: ``config`` itself or the sub-config of its class.

    The auto mapping may name a text-only class (Llama4ForCausalLM) for a composite config.
    """
    wanted = getattr(cls, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, wanted):
            return sub
    return config


def _token_ids(config: Any) -> set[int]:
    ids: set[int] = set()

    def walk(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if _is_subconfig(value):
                walk(value)
            elif _TOKEN_ID.search(key):
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, int) and not isinstance(v, bool):
                        ids.add(v)

    walk(config.to_dict())
    return ids


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random weights everywhere, routers and experts included.

    Matrices get N(0, std) afresh; vectors (norm scales, biases, gates) are perturbed around their
    initialised value so norms stay near 1. Several families initialise routers or correction
    biases to zero, which makes routing degenerate (every token ties); this breaks the ties.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if p.dim() >= 2:
                p.copy_(noise.to(p.dtype))
            else:
                p.add_(noise.to(p.dtype))
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if "correction_bias" in name and b.is_floating_point():
                b.copy_((torch.randn(b.shape, generator=gen) * 0.1).to(b.dtype))


def _keep_fp32_names(model: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """Parameters/buffers the family keeps in fp32 at ``dtype``, as ``from_pretrained(dtype=...)``
    does (``_keep_in_fp32_modules_strict``; the non-strict list only for fp16): Inkling2's router
    runs its matmul in fp32."""
    keep: set[str] = set()
    for prefix, module in model.named_modules():
        patterns = list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            patterns += list(getattr(module, "_keep_in_fp32_modules", None) or [])
        if not patterns:
            continue
        regex = re.compile(r"(^|\.)(" + "|".join(re.escape(p) for p in patterns) + r")($|\.)")
        for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
            if regex.search(name):
                keep.add(f"{prefix}.{name}" if prefix else name)
    return keep


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        return
    keep = _keep_fp32_names(model, dtype)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in keep and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, **config_overrides: Any):
    """``(model, example_inputs)`` for the MoE family ``model_type``.

    The model is the family's causal LM if it has one, else its image-text-to-text / seq2seq /
    base model; random seeded weights, eval mode, ``dtype``. ``example_inputs`` are forward kwargs
    (``input_ids`` of batch 2 x 8 tokens avoiding special token ids, plus what the family needs).
    """
    family = moe_family_info(model_type)
    spec = _FAMILY_OVERRIDES.get(model_type, TinySpec())
    config = tiny_config(model_type, **config_overrides)
    cls = _model_class(family, spec)
    model_config = getattr(config, spec.submodel) if spec.submodel else _config_for(cls, config)
    torch.manual_seed(seed)
    model = cls(model_config)
    _randomize(model, seed)
    _cast(model, dtype)
    model.eval()

    gen = torch.Generator().manual_seed(seed + 1)
    if spec.inputs is not None:
        inputs = spec.inputs(model_config, gen)
    else:
        allowed = torch.tensor(sorted(set(range(VOCAB)) - _token_ids(config)))
        ids = allowed[torch.randint(len(allowed), (BATCH, SEQ), generator=gen)]
        inputs = {"input_ids": ids}
        if "decoder_input_ids" in inspect.signature(model.forward).parameters:
            # Seq2seq decoders, and DiffusionGemma's canvas (sampled at random when not given,
            # which would make two forwards differ).
            length = getattr(model_config, "canvas_length", None) or SEQ
            inputs["decoder_input_ids"] = allowed[torch.randint(len(allowed), (BATCH, length), generator=gen)]
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            inputs[key] = value.to(dtype)
    return model, inputs


def main_output(outputs: Any) -> torch.Tensor:
    """The tensor a test compares: ``logits``, else ``last_hidden_state``, else the first tensor."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(outputs, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if hasattr(outputs, "feature_maps"):
        return torch.cat([f.flatten(1) for f in outputs.feature_maps], dim=1)
    if isinstance(outputs, torch.Tensor):
        return outputs
    for value in outputs.values() if hasattr(outputs, "values") else outputs:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in model outputs of type {type(outputs).__name__}")
