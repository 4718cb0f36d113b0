"""Tiny dense checkpoints for the upcycling tests: random weights, real safetensors, no download.

Each source family is configured with the details that get lost silently when a converter forgets
them: rope scaling, a sliding window shorter than the test sequences, tied embeddings, an odd norm
eps, GQA, explicit head_dim, non-default token ids and a generation config.
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN, FFN, LAYERS, VOCAB = 32, 64, 2, 128

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def source_config(family: str, **overrides):
    """A transformers config for a tiny dense model of ``family`` (``overrides`` replace fields)."""
    from transformers import (
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Qwen2Config,
        Qwen3Config,
    )

    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    classes = {
        "llama": (LlamaConfig, dict(rope_parameters=llama3_rope, tie_word_embeddings=True)),
        "mistral": (MistralConfig, dict(sliding_window=16, head_dim=16)),
        "qwen2": (
            Qwen2Config,
            dict(
                rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}, tie_word_embeddings=True
            ),
        ),
        "qwen3": (Qwen3Config, dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 20000.0})),
        "olmo2": (Olmo2Config, dict(rope_parameters={"rope_type": "default", "rope_theta": 30000.0})),
    }
    cls, fields = classes[family]
    return cls(**{**COMMON, **fields, **overrides})


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")
EXPECTED_TARGET = {
    "llama": "MixtralForCausalLM",
    "mistral": "MixtralForCausalLM",
    "qwen2": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3MoeForCausalLM",
    "olmo2": "FlexOlmoForCausalLM",
}


def make_dense(path: Path, family: str = "llama", *, seed: int = 0, config=None, scale: float = 1.0) -> Path:
    """Save a tiny random dense model of ``family`` (fp32 safetensors) to ``path`` and return it.

    Weights are drawn with a larger std than transformers' init so that the logits are far from
    uniform and greedy decoding is a sharp test.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    cfg = config or source_config(family)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, scale * 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=7).save_pretrained(path)
    return Path(path)


def perturbed_copy(src: Path, dst: Path, *, seed: int, std: float = 0.02) -> Path:
    """A 'fine-tune' of ``src``: same config, every weight nudged (for Branch-Train-MiX tests)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(dst)
    return Path(dst)


def make_lora(base: Path, dst: Path, *, seed: int, targets=("gate_proj", "up_proj", "down_proj"), r: int = 4) -> Path:
    """A random peft LoRA adapter for the model in ``base`` (B is non-zero so the update matters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(dst)
    return Path(dst)


def save_word_tokenizer(path: Path, words: list[str]) -> None:
    """Save a tiny word-level fast tokenizer (built locally, nothing downloaded) next to a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
