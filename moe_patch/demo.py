"""The built-in default job: build a small random MoE checkpoint, inspect it from disk, patch it,
generate, and check the patched model against the Hugging Face forward. No download."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEMO_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


def demo_config(family: str = "qwen3_moe"):
    """A small random-weight config of a real MoE family (a few MB of weights)."""
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=512,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            intermediate_size=512,
            moe_intermediate_size=128,
            num_experts=32,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            head_dim=32,
            **common,
        )
    if family == "mixtral":
        return MixtralConfig(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, **common)
    if family == "deepseek_v3":
        return DeepseekV3Config(
            intermediate_size=512,
            moe_intermediate_size=128,
            n_routed_experts=32,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=64,
            kv_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
            **common,
        )
    from .errors import MoEConfigError

    raise MoEConfigError(f"unknown demo family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")


MARKER = "moe_patch_demo.json"  # marks a folder this demo wrote, the only kind it will replace


def build_demo_checkpoint(out: str | Path, family: str = "qwen3_moe", seed: int = 0) -> Path:
    """Write a random-weight checkpoint (safetensors) to ``out``, atomically (temp dir, then rename).

    An existing ``out`` is replaced only if an earlier demo run wrote it; any other non-empty folder
    is refused, so a mistyped ``--out`` never deletes anything.
    """
    from transformers import AutoModelForCausalLM

    from .atomic import atomic_dir
    from .errors import OutputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose an empty or new folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"{out} exists and was not written by `moe-patch demo`; choose an empty or new folder")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(demo_config(family))
    with torch.no_grad():  # routers of some families start at zero: give every weight a random value
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    # replace=True: an empty folder or a previous demo checkpoint (checked above)
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, max_shard_size="4MB")
        (tmp / MARKER).write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    return out


@dataclass
class DemoResult:
    checkpoint: str
    max_rel_logit_diff: float
    tokens_identical: bool
    generated: list[int]
    prefill_ms_reference: float
    prefill_ms_patched: float
    decode_ms_reference: float  # per generated token, prefill included
    decode_ms_patched: float


def _median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_demo(checkpoint: str | Path, new_tokens: int = 32, prompt_len: int = 128, seed: int = 0) -> DemoResult:
    """Load ``checkpoint``, compare patched vs reference logits and greedy tokens, time both."""
    from transformers import AutoModelForCausalLM

    from . import patch_model, unpatch_model

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    batch = torch.randint(0, vocab, (4, prompt_len), generator=g)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ref_logits = model(batch).logits
        ref_tokens = model.generate(prompt, **gen)
        ref_prefill = _median_ms(lambda: model(batch))
        ref_decode = _median_ms(lambda: model.generate(prompt, **gen), repeats=3) / new_tokens
        patch_model(model)
        logits = model(batch).logits
        tokens = model.generate(prompt, **gen)
        prefill = _median_ms(lambda: model(batch))
        decode = _median_ms(lambda: model.generate(prompt, **gen), repeats=3) / new_tokens
    unpatch_model(model)
    rel = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
    return DemoResult(
        checkpoint=str(checkpoint),
        max_rel_logit_diff=rel,
        tokens_identical=bool(torch.equal(tokens, ref_tokens)),
        generated=tokens[0, prompt_len:].tolist(),
        prefill_ms_reference=ref_prefill,
        prefill_ms_patched=prefill,
        decode_ms_reference=ref_decode,
        decode_ms_patched=decode,
    )
