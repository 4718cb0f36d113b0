"""Dense -> Mixture-of-Experts converters (upcycling) that write stock transformers checkpoints.

Public API::

    from converters import upcycle, plan_upcycle, UpcycleConfig

    report = upcycle("path/to/llama", "path/to/llama-8x", UpcycleConfig(num_experts=8, top_k=2))
    print(report)             # also OUT/upcycle_report.json

The output loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` (no remote code). Recipes and
which of them are exact at init: docs/upcycling.md.
"""

from __future__ import annotations

import importlib

# Lazy, like moe_patch/__init__: `import converters` must not pay for importing torch until a name is used.
# Name -> submodule that defines it.
_EXPORTS = {
    "REPORT_NAME": "pipeline",
    "UpcycleConfig": "pipeline",
    "UpcyclePlan": "pipeline",
    "UpcycleReport": "pipeline",
    "VerificationError": "pipeline",
    "plan_upcycle": "pipeline",
    "upcycle": "pipeline",
    "ExpertLayout": "recipes",
    "SOURCES": "targets",
    "TARGETS": "targets",
    "Verification": "verify",
    "compare_models": "verify",
    "verify_folders": "verify",
    "OutputError": "writer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
