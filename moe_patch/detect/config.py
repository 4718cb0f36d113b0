"""Checkpoint folders without weights: validate MoE config fields, build the model on ``meta``,
and summarise the safetensors index. Reads ``config.json`` and ``*.safetensors.index.json`` only."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, MoEConfigError
from ..io import read_header, read_index

#: Config fields that count routed experts / say how many a token picks, across transformers families.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_FIELDS = (
    "num_experts_per_tok",
    "moe_top_k",
    "moe_topk",
    "top_k_experts",
    "top_k",
    "moe_k",
    "num_selected_experts",
)
ZERO_EXPERT_FIELDS = ("zero_expert_num",)


def _dicts(d: dict, prefix: str = ""):
    """Every dict level of a config (sub-configs and nested dicts such as DBRX's ffn_config)."""
    yield prefix, d
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _dicts(value, f"{prefix}{key}.")


def validate_moe_config(config) -> None:
    """Raise :class:`MoEConfigError` (a ``ValueError``) naming the field and value when the MoE fields of a
    config (a transformers config or the raw ``config.json`` dict, sub-configs included) cannot describe
    an MoE: top-k that is not a positive integer (e.g. the string ``"64 2"``), zero or negative experts,
    top-k above the number of experts."""
    raw = config if isinstance(config, dict) else config.to_dict()
    for where, c in _dicts(raw):
        top_ks = {n: c[n] for n in TOP_K_FIELDS if c.get(n) is not None}
        if not top_ks:
            continue
        experts = {n: c[n] for n in EXPERT_COUNT_FIELDS if c.get(n) is not None}
        if all(v == 0 for v in (*experts.values(), *top_ks.values())):
            continue  # a dense variant of an MoE family (e.g. Granite-4 hybrid with 0 experts, top-k 0)
        for name, value in {**experts, **top_ks}.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise MoEConfigError(f"config field {where}{name} must be an integer, got {value!r}")
        for name, value in top_ks.items():
            if value < 1:
                raise MoEConfigError(f"config field {where}{name} must be >= 1, got {value}")
        for name, value in experts.items():
            if value < 1:
                raise MoEConfigError(f"config field {where}{name} must be >= 1 for an MoE, got {value}")
        if experts:
            zero = next((c[n] for n in ZERO_EXPERT_FIELDS if isinstance(c.get(n), int)), 0)
            n_name, n_experts = next(iter(experts.items()))
            for name, value in top_ks.items():
                if value > n_experts + zero:
                    raise MoEConfigError(f"config field {where}{name} = {value} exceeds {where}{n_name} = {n_experts}")


def read_raw_config(folder: str | Path) -> dict:
    """``config.json`` of a local folder as a dict, with its top-level shape checked (the fields transformers
    would otherwise trip over with a traceback, and the MoE fields)."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found; a checkpoint folder needs its config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except OSError as exc:
        raise CheckpointError(f"{cfg_path}: cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoEConfigError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise MoEConfigError(f"{cfg_path}: no 'model_type' field; is this a transformers checkpoint?")
    qc = raw.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise MoEConfigError(
            f"{cfg_path}: quantization_config must be a JSON object (quant_method and its fields), "
            f"got {type(qc).__name__} {json.dumps(qc)[:40]}"
        )
    validate_moe_config(raw)  # before transformers' own checks, whose errors do not name our fields
    return raw


def load_config(folder: str | Path, *, trust_remote_code: bool = False):
    """``AutoConfig`` for a local folder, with clear errors for a missing or malformed config.json."""
    from transformers import AutoConfig

    folder = Path(folder)
    cfg_path = folder / "config.json"
    raw = read_raw_config(folder)
    if raw.get("auto_map") and not trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if raw["model_type"] not in CONFIG_MAPPING_NAMES:
            raise MoEConfigError(
                f"{cfg_path}: model_type {raw['model_type']!r} needs the checkpoint's own Python code; "
                "re-run with --trust-remote-code if you trust its authors"
            )
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as exc:  # strict fields: e.g. hidden_size "abc"
        detail = " ".join(str(exc).split())
        raise MoEConfigError(f"{cfg_path}: transformers cannot read this config: {detail}") from exc
    return config


def meta_model(config, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """Instantiate the model for ``config`` on the meta device (no memory, no weights read)."""
    import transformers
    from transformers import AutoBackbone, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.initialization import no_init_weights

    # The classes the checkpoint names first (e.g. Qwen3OmniMoeForConditionalGeneration), then the autos.
    named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
    builders = [lambda c, cls=cls: cls._from_config(c) for cls in named if cls is not None]
    builders += [
        lambda c, auto=auto: auto.from_config(c, trust_remote_code=trust_remote_code)
        for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel, AutoBackbone)
    ]
    builders += [lambda c, cls=cls: cls._from_config(c) for cls in _family_model_classes(config)]
    last: Exception | None = None
    for build in builders:
        try:
            # no_init_weights: initialising ~700 B meta parameters still walks every module (seconds).
            with torch.device("meta"), no_init_weights():
                return build(config)
        except (ValueError, TypeError, AttributeError) as exc:  # not this class: try the next one
            last = exc
    raise MoEConfigError(f"transformers has no model class for model_type {config.model_type!r}: {last}")


def _family_model_classes(config) -> list[type]:
    """Model classes of the config's own modeling module that take this config class (for families no
    auto class maps, e.g. Qwen3-Omni-MoE), generation heads first."""
    import importlib

    from transformers import PreTrainedModel

    module_name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    classes = [
        c
        for c in vars(module).values()
        if isinstance(c, type)
        and issubclass(c, PreTrainedModel)
        and "PreTrained" not in c.__name__
        and getattr(c, "config_class", None) is type(config)
    ]
    order = ("ForCausalLM", "ForConditionalGeneration", "Model")
    return sorted(classes, key=lambda c: next((i for i, sfx in enumerate(order) if c.__name__.endswith(sfx)), 9))


@dataclass
class CheckpointSummary:
    """What the safetensors index says about a checkpoint (no tensor data is read)."""

    folder: str
    shards: list[str] = field(default_factory=list)
    total_bytes: int | None = None
    tensors: int = 0
    per_expert_tensors: int = 0
    fused_expert_tensors: int = 0
    dtype: str | None = None  #: the checkpoint's dtype as config.json states it

    @property
    def bytes_per_param(self) -> int:
        return {"float32": 4, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}.get(self.dtype or "", 2)

    @property
    def expert_storage(self) -> str:
        if self.per_expert_tensors:
            return "per-expert tensors"
        return "fused 3-D tensors" if self.fused_expert_tensors else "unknown"


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj|up_proj|w1|w2|w3)")


def summarize_checkpoint(folder: str | Path) -> CheckpointSummary:
    """Read ``model.safetensors.index.json`` (or list a single ``model.safetensors``)."""
    folder = Path(folder)
    summary = CheckpointSummary(folder=str(folder))
    try:
        raw = json.loads((folder / "config.json").read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        summary.dtype = dtype if isinstance(dtype, str) else None
    except (OSError, json.JSONDecodeError):
        pass
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_index(indexes[0])  # the index only: no shard is opened
        summary.shards = index.shards
        summary.total_bytes = index.total_size
        keys = list(index.weight_map)
    else:
        # The package's one safetensors reader: headers only, a truncated or unreadable shard named.
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        summary.shards = shards
        keys = []
        for shard in shards:
            keys += list(read_header(folder / shard))
        if shards:
            summary.total_bytes = sum((folder / s).stat().st_size for s in shards)
    summary.tensors = len(keys)
    summary.per_expert_tensors = sum(1 for k in keys if _PER_EXPERT.search(k))
    summary.fused_expert_tensors = sum(1 for k in keys if _FUSED.search(k))
    return summary
