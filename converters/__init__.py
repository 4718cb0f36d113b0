"""Dense -> Mixture-of-Experts converters (upcycling) that write stock transformers checkpoints.

Public API::

    from converters import upcycle, plan_upcycle, UpcycleConfig

    report = upcycle("path/to/llama", "path/to/llama-8x", UpcycleConfig(num_experts=8, top_k=2))
    print(report)             # also OUT/upcycle_report.json

The output loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` (no remote code). Recipes and
which of them are exact at init: docs/upcycling.md.
"""

from __future__ import annotations

from .pipeline import (
    REPORT_NAME,
    UpcycleConfig,
    UpcyclePlan,
    UpcycleReport,
    VerificationError,
    plan_upcycle,
    upcycle,
)
from .recipes import ExpertLayout
from .targets import SOURCES, TARGETS
from .verify import Verification, compare_models, verify_folders
from .writer import OutputError

__all__ = [
    "REPORT_NAME",
    "SOURCES",
    "TARGETS",
    "ExpertLayout",
    "OutputError",
    "UpcycleConfig",
    "UpcyclePlan",
    "UpcycleReport",
    "Verification",
    "VerificationError",
    "compare_models",
    "plan_upcycle",
    "upcycle",
    "verify_folders",
]
