"""A small dense Llama to upcycle, for examples and benchmarks that must run offline on a CPU."""

from __future__ import annotations

import torch


def small_dense_llama(
    vocab_size: int,
    *,
    hidden: int = 128,
    layers: int = 4,
    ffn: int | None = None,
    head_dim: int = 32,
    max_positions: int = 2048,
    eos_token_id: int = 0,
    seed: int = 0,
):
    """A randomly initialised ``LlamaForCausalLM`` (transformers' own init, seeded): ``hidden / head_dim``
    heads, an FFN of ``ffn`` (default ~2.7x hidden, a multiple of 8), untied embeddings, and
    ``eos_token_id`` as BOS/EOS/pad (0 is :func:`~moe_patch.training.data.train_byte_bpe`'s ``<|endoftext|>``).
    A source ``converters.upcycle`` accepts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(hidden // head_dim, 1)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn or 8 * round(hidden * 8 / 3 / 8),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
