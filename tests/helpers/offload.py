"""Tiny random MoE checkpoints for the offload tests, saved as real safetensors in a temp dir."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, MixtralConfig, MixtralForCausalLM

VOCAB = 128


def _common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def config_for(family: str):
    """A tiny config of ``family`` (2 layers, hidden 32, 4-8 experts, top-2)."""
    C = transformers
    if family == "mixtral":
        return C.MixtralConfig(
            **_common(intermediate_size=48, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        )
    if family == "qwen2_moe":
        return C.Qwen2MoeConfig(
            **_common(
                intermediate_size=64,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=32,
                num_key_value_heads=2,
                num_experts=8,
                num_experts_per_tok=2,
            )
        )
    if family == "qwen3_moe":
        return C.Qwen3MoeConfig(
            **_common(
                intermediate_size=64,
                moe_intermediate_size=16,
                num_key_value_heads=2,
                num_experts=8,
                num_experts_per_tok=2,
                head_dim=8,
            )
        )
    if family == "deepseek_v3":
        return C.DeepseekV3Config(
            **_common(
                intermediate_size=64,
                moe_intermediate_size=16,
                first_k_dense_replace=0,
                num_key_value_heads=4,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_group=2,
                topk_group=1,
                n_shared_experts=1,
                q_lora_rank=16,
                kv_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                routed_scaling_factor=2.5,
            )
        )
    if family == "gpt_oss":
        return C.GptOssConfig(
            **_common(
                intermediate_size=16,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                head_dim=8,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=16,
            )
        )
    if family == "module_list":
        return TinyListMoeConfig(
            **_common(intermediate_size=24, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
        )
    raise KeyError(family)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "module_list")


# -- a 4.x-style model: experts are an nn.ModuleList of MLP modules, saved with per-expert keys ----------
class TinyListMoeConfig(MixtralConfig):
    model_type = "tiny_list_moe"


class TinyExpertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TinyListMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList([TinyExpertMLP(config) for _ in range(config.num_local_experts)])

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        w, sel = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            tok, slot = torch.where(sel == e)
            if tok.numel():
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out.reshape(shape)


class TinyListMoeForCausalLM(MixtralForCausalLM):
    config_class = TinyListMoeConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = TinyListMoeBlock(config)
        self.post_init()


AutoConfig.register("tiny_list_moe", TinyListMoeConfig, exist_ok=True)


def model_class(family: str):
    return TinyListMoeForCausalLM if family == "module_list" else None


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = config_for(family)
    cls = TinyListMoeForCausalLM if family == "module_list" else transformers.AutoModelForCausalLM
    model = cls(cfg) if family == "module_list" else cls.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init is small; widen the router so routing is far from ties
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                p.normal_(0, 1.0)
    return model.eval()


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    """Build, save (safetensors) and return the checkpoint directory of a tiny ``family`` model."""
    model = build(family, seed)
    model.save_pretrained(directory)
    return Path(directory)


def save_families(root: Path) -> dict[str, Path]:
    """One tiny checkpoint of every family in :data:`FAMILIES`, under ``root``."""
    return {fam: save_tiny(fam, root / fam) for fam in FAMILIES}


def load_reference(family: str, directory: Path) -> nn.Module:
    cls = TinyListMoeForCausalLM if family == "module_list" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(directory, dtype=torch.float32).eval()


def prompts(batch: int, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


def expert_bytes(family: str) -> int:
    """Bytes of one routed expert of the tiny ``family`` model (fp32)."""
    from moe_patch.offload.layers import find_offload_layers

    return max(layer.expert_bytes for layer in find_offload_layers(build(family)))


def non_expert_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (after offloading: the resident part)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
