"""Every registered family offloads (same outputs as resident) or says why it cannot."""

from __future__ import annotations

import pytest
import torch

from moe_patch import patch_model, unpatch_model
from moe_patch.families import FAMILIES, find_moe_blocks
from moe_patch.offload import OffloadOptions
from moe_patch.testing.legacy import legacy_moe_model
from moe_patch.testing.tiny import main_output, tiny_model

#: a tiny model of each offloadable family (a new offloadable family must add one)
EXAMPLES = {
    "experts_interface": lambda: tiny_model("mixtral"),
    "llama4_dense": lambda: tiny_model("llama4"),
    "flat_2d": lambda: tiny_model("dbrx"),
    "module_list": lambda: _legacy(),
    "routed_list": lambda: tiny_model("switch_transformers"),
    "per_image": lambda: tiny_model("vitpose_backbone"),
}


def _legacy():
    model = legacy_moe_model("mixtral")
    return model, {
        "input_ids": torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    }


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_offloads_or_says_why(family):
    if family.offload_unsupported is not None:
        assert len(family.offload_unsupported.split()) >= 5, "a reason a user can act on"
        return
    assert family.name in EXAMPLES, f"add a tiny model of the offloadable family {family.name} to EXAMPLES"
    model, inputs = EXAMPLES[family.name]()
    assert any(h.family is family for h in find_moe_blocks(model))
    with torch.no_grad():
        want = main_output(model(**inputs))
        one = max(h.family.expert_tensors(h.experts).expert_bytes for h in find_moe_blocks(model))
        patch_model(model, offload=OffloadOptions(expert_cache=one, calibrate=False))
        try:
            got = main_output(model(**inputs))
        finally:
            unpatch_model(model)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(main_output(model(**inputs)), want)  # detached: the resident model again
