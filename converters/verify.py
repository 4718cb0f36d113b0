"""End-to-end check of an upcycled checkpoint against its dense source: logits and greedy tokens.

Both models are loaded the stock way (``AutoModelForCausalLM.from_pretrained``, no remote code) in
fp32, so the check also proves the output loads with plain transformers and that no config detail
(rope scaling, sliding window, tied embeddings, norms) was lost on the way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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
    #: what is known to explain a failure (weights transformers initialised at random, logits that are not finite);
    #: empty when the models load completely and compute finite logits
    causes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load(folder: Path, role: str) -> tuple[torch.nn.Module, list[str]]:
    """The model in ``folder`` in fp32, and what its loading says would make it differ (named for ``role``)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=False, output_loading_info=True
    )
    model.eval()
    causes = []
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        causes.append(f"{role} lacks {len(keys)} tensor(s) transformers initialised at random ({', '.join(keys[:3])})")
    if info.get("mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
        causes.append(f"{role} has {len(keys)} tensor(s) of the wrong shape ({', '.join(keys[:3])})")
    return model, causes


def _logit_causes(ref: torch.Tensor, out: torch.Tensor) -> list[str]:
    if not bool(torch.isfinite(ref).all()):
        return [
            "the dense model's own logits are not finite (its weights overflow fp32 on random tokens), so no "
            "upcycled model can be compared with it"
        ]
    if not bool(torch.isfinite(out).all()):
        return ["the upcycled model's logits are not finite where the dense model's are"]
    return []


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
    passed = rel <= tolerance and agreement == 1.0
    return Verification(
        max_abs_logit_diff=max_abs,
        rel_diff=rel,
        greedy_token_agreement=agreement,
        greedy_tokens_compared=int(same.numel()),
        first_divergence=min(diverge) if diverge else None,
        batch_size=batch_size,
        sequence_length=sequence_length,
        tolerance=tolerance,
        passed=passed,
        causes=() if passed else tuple(_logit_causes(ref, out)),
    )


def verify_folders(
    dense_dir: Path, moe_dir: Path, *, seed: int = 0, tolerance: float = EXACT_TOLERANCE
) -> Verification:
    """Load both checkpoints in fp32 and :func:`compare_models` them (needs both models in RAM); a failure carries
    what loading said about either model among its causes."""
    dense, dense_causes = _load(Path(dense_dir), "the dense source")
    moe, moe_causes = _load(Path(moe_dir), "the upcycled model")
    try:
        result = compare_models(dense, moe, vocab_size=int(dense.config.vocab_size), seed=seed, tolerance=tolerance)
    finally:
        del dense, moe
    if result.passed:
        return result
    return replace(result, causes=(*dense_causes, *moe_causes, *result.causes))
