"""The one place that lists MoE families of transformers that moe-patch does not support.

Every other MoE family the installed transformers defines is discovered from its sources
(:func:`moe_patch.testing.discover.discover_moe_families`) and must pass the patch test in
``tests/families/test_families.py``; a new family that is neither supported nor listed here fails the suite.

A family belongs here only with a written reason that moe-patch cannot fix (it needs an external
kernel, it cannot be built small on a CPU, ...), never to hide a failure that could be fixed.
"""

from __future__ import annotations

__all__ = ["UNSUPPORTED", "is_supported"]

#: model_type -> why moe-patch does not patch this family.
UNSUPPORTED: dict[str, str] = {
    # Detected (moe_patch.families.doge) and reported, deliberately not patched.
    "doge": (
        "CDMoE retrieval experts are single neurons (rows of two embedding tables picked by a "
        "product-key router); transformers already computes them with one gather and two batched "
        "matmuls, so there is no per-expert dispatch to replace"
    ),
}


def is_supported(model_type: str) -> bool:
    """False when ``model_type`` is listed in :data:`UNSUPPORTED`."""
    return model_type not in UNSUPPORTED
