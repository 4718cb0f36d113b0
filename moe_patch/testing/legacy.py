"""Small MoE causal LMs whose experts are a ``ModuleList`` of MLP modules.

They stand for transformers-4.x-style and remote-code models (4.x Mixtral, DeepSeek-V2's
``modeling_deepseek.py``) that moe-patch must detect and patch by structure alone. Two block styles:

- ``"mixtral"``: ``gate`` is an ``nn.Linear``; the block does softmax -> top-k -> renormalise and
  returns ``(hidden, router_logits)``; experts use ``w1/w3/w2``.
- ``"deepseek"``: ``gate`` is a module returning ``(topk_idx, topk_weight, aux_loss)``; a shared
  expert is added; experts use ``gate_proj/up_proj/down_proj``.

Each layer mixes tokens with a causal running mean (no attention, no KV cache: ``generate`` runs
with ``use_cache=False``), enough for generation to depend on the whole prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class LegacyMoeConfig(PretrainedConfig):
    model_type = "moe_patch_legacy"

    def __init__(
        self,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_experts=8,
        num_experts_per_tok=2,
        block_style="mixtral",
        norm_topk_prob=True,
        shared_intermediate_size=48,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.block_style = block_style
        self.norm_topk_prob = norm_topk_prob
        self.shared_intermediate_size = shared_intermediate_size
        super().__init__(**kwargs)


class MixtralStyleExpert(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.w1 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class DeepseekStyleMLP(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MixtralStyleBlock(nn.Module):
    """transformers 4.x MixtralSparseMoeBlock, abridged."""

    def __init__(self, config: LegacyMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [MixtralStyleExpert(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts)]
        )

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((b * s, h), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            if top_x.numel() == 0:
                continue
            out = self.experts[e](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, out.to(hidden_states.dtype))
        return final.reshape(b, s, h), router_logits


class DeepseekStyleGate(nn.Module):
    """DeepSeek-V2 remote-code MoEGate, abridged: softmax scores, top-k, optional renormalisation."""

    def __init__(self, config: LegacyMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states):
        h = hidden_states.shape[-1]
        logits = F.linear(hidden_states.view(-1, h).float(), self.weight.float())
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight, None


class DeepseekStyleBlock(nn.Module):
    def __init__(self, config: LegacyMoeConfig):
        super().__init__()
        self.experts = nn.ModuleList(
            [DeepseekStyleMLP(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts)]
        )
        self.gate = DeepseekStyleGate(config)
        self.shared_experts = DeepseekStyleMLP(config.hidden_size, config.shared_intermediate_size)

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        x = hidden_states.view(-1, shape[-1])
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(topk_idx == e)
            if tok.numel():
                y.index_add_(0, tok, (expert(x[tok]) * topk_weight[tok, slot, None]).to(x.dtype))
        return y.view(*shape) + self.shared_experts(identity)


class LegacyMoeLayer(nn.Module):
    def __init__(self, config: LegacyMoeConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        style = {"mixtral": MixtralStyleBlock, "deepseek": DeepseekStyleBlock}[config.block_style]
        self.block_sparse_moe = style(config)

    def forward(self, h):
        # Causal token mixing: running mean over the prefix.
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
        h = h + torch.cumsum(h, dim=1) / steps
        out = self.block_sparse_moe(self.norm(h))
        return h + (out[0] if isinstance(out, tuple) else out)


class LegacyMoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LegacyMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LegacyMoeLayer"]

    def __init__(self, config: LegacyMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LegacyMoeLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.2)
        elif isinstance(module, DeepseekStyleGate):
            nn.init.normal_(module.weight, std=0.2)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}


def legacy_moe_model(block_style: str = "mixtral", seed: int = 0, **config_kwargs) -> LegacyMoeForCausalLM:
    """A random-weight legacy-style MoE LM in eval mode (``block_style``: "mixtral" or "deepseek")."""
    torch.manual_seed(seed)
    return LegacyMoeForCausalLM(LegacyMoeConfig(block_style=block_style, **config_kwargs)).eval()
