"""Thousands of decode steps under constant eviction, with prefetch on, checked step by step."""

from __future__ import annotations

import torch
from transformers import DynamicCache

import moe_patch
from moe_patch.offload import get_offload_handle
from tests.helpers.offload import expert_bytes, load_reference, prompts, save_tiny

STEPS = 2000


@torch.no_grad()
def test_two_thousand_decode_steps_match_reference_every_step(tmp_path):
    path = save_tiny("qwen3_moe", tmp_path / "q")
    ref = load_reference("qwen3_moe", path)
    budget = 3 * expert_bytes("qwen3_moe")  # 3 of 16 experts: nearly every step evicts
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=budget, prefetch=True)
    handle = get_offload_handle(model)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        if step % 500 == 0:  # four sequences of 500 steps keep attention cheap; the caches carry over
            ids = prompts(1, seed=step)
            ref_cache, off_cache = DynamicCache(config=ref.config), DynamicCache(config=model.config)
            ref_logits = ref(ids, past_key_values=ref_cache, use_cache=True).logits[:, -1]
            off_logits = model(ids, past_key_values=off_cache, use_cache=True).logits[:, -1]
        assert torch.allclose(off_logits, ref_logits, rtol=1e-5, atol=1e-5), f"step {step} diverged"
        # half greedy, half random tokens, so routing keeps moving across all experts
        nxt = ref_logits.argmax(-1, keepdim=True) if step % 2 else torch.randint(0, 128, (1, 1), generator=gen)
        ref_logits = ref(nxt, past_key_values=ref_cache, use_cache=True).logits[:, -1]
        off_logits = model(nxt, past_key_values=off_cache, use_cache=True).logits[:, -1]
    st = handle.stats
    assert st.steps["decode"] == STEPS
    assert handle.engine.dev.evictions > STEPS  # constant eviction
    assert handle.engine.dev.peak <= budget
    assert st.prefetch_issued > 0 and 0 < st.prefetch_recall <= 1
