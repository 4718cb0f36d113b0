"""End-to-end check of an upcycled checkpoint against its dense source: logits and greedy tokens.

Both models are loaded the stock way (``AutoModelForCausalLM.from_pretrained``, no remote code) in
fp32, so the check also proves the output loads with plain transformers and that no config detail
(rope scaling, sliding window, tied embeddings, norms) was lost on the way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .recipes import seeded_generator

#: Relative logit difference above which an *exact* recipe is reported as failed.
EXACT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Verification:
    """What ``--verify`` measured. ``rel_diff`` is max |dense - moe| / max |dense| over all logits."""

    max_abs_logit_diff: float
    rel_diff: float
    greedy_token_agreement: float
    greedy_tokens_compared: int
    first_divergence: int | None  # index of the first generated token that differs, per the worst row
    batch_size: int
    sequence_length: int
    tolerance: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    model.eval()
    return model


@torch.no_grad()
def compare_models(
    dense: torch.nn.Module,
    moe: torch.nn.Module,
    *,
    vocab_size: int,
    seed: int = 0,
    batch_size: int = 2,
    sequence_length: int = 48,
    new_tokens: int = 32,
    tolerance: float = EXACT_TOLERANCE,
) -> Verification:
    """Compare two loaded causal LMs on seeded random token ids (logits) and greedy generation."""
    from transformers import GenerationConfig

    gen = seeded_generator(seed, "verify")
    ids = torch.randint(vocab_size, (batch_size, sequence_length), generator=gen)
    ref = dense(input_ids=ids).logits.float()
    out = moe(input_ids=ids).logits.float()
    max_abs = float((ref - out).abs().max())
    rel = max_abs / max(float(ref.abs().max()), 1e-30)

    prompt = ids[:, : min(8, sequence_length)]
    gcfg = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None
    )
    a = dense.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gcfg)[:, prompt.shape[1] :]
    b = moe.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gcfg)[:, prompt.shape[1] :]
    n = min(a.shape[1], b.shape[1])
    same = a[:, :n] == b[:, :n]
    agreement = float(same.float().mean()) if same.numel() else 1.0
    diverge = [int((~row).nonzero()[0]) for row in same if not bool(row.all())]
    return Verification(
        max_abs_logit_diff=max_abs,
        rel_diff=rel,
        greedy_token_agreement=agreement,
        greedy_tokens_compared=int(same.numel()),
        first_divergence=min(diverge) if diverge else None,
        batch_size=batch_size,
        sequence_length=sequence_length,
        tolerance=tolerance,
        passed=rel <= tolerance and agreement == 1.0,
    )


def verify_folders(
    dense_dir: Path, moe_dir: Path, *, seed: int = 0, tolerance: float = EXACT_TOLERANCE
) -> Verification:
    """Load both checkpoints in fp32 and :func:`compare_models` them (needs both models in RAM)."""
    dense = _load(Path(dense_dir))
    moe = _load(Path(moe_dir))
    try:
        return compare_models(dense, moe, vocab_size=int(dense.config.vocab_size), seed=seed, tolerance=tolerance)
    finally:
        del dense, moe
