"""Offloaded generation is token-for-token the resident model's, for every family and budget.

Each tiny model is saved as a real safetensors checkpoint, loaded back by ``moe_patch.load_model``
with its experts left on disk, and compared with the same checkpoint loaded fully resident by
transformers (fp32, greedy, 64 new tokens).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import moe_patch
from moe_patch.errors import MoEPatchError
from moe_patch.offload import get_offload_handle
from tests.helpers.offload import (
    FAMILIES,
    expert_bytes,
    greedy,
    load_reference,
    model_class,
    prompts,
    save_families,
)

NEW = 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_families(tmp_path_factory.mktemp("offload_ckpts"))


@pytest.fixture(scope="module")
def references(checkpoints):
    torch.set_num_threads(1)
    out = {}
    for fam, path in checkpoints.items():
        ref = load_reference(fam, path)
        out[fam] = {b: greedy(ref, prompts(b), NEW) for b in (1, 4)}
    return out


def _budget(fam: str, which: str) -> int | None:
    one = expert_bytes(fam)
    return {"one_expert": one, "one_per_layer": 2 * one, "everything": None}[which]


@pytest.mark.parametrize("budget", ["one_expert", "one_per_layer", "everything"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_resident_model(family, batch, budget, checkpoints, references):
    limit = _budget(family, budget)
    model = moe_patch.load_model(
        checkpoints[family], model_class=model_class(family), dtype=torch.float32, expert_cache=limit
    )
    handle = get_offload_handle(model)
    try:
        out = greedy(model, prompts(batch), NEW)
        assert torch.equal(out, references[family][batch])
        stats, cache = handle.stats, handle.engine.dev
        assert stats.tokens["decode"] == batch * (NEW - 1)
        if limit is not None:
            assert cache.peak <= limit  # a hard budget
            assert cache.evictions > 0 and stats.bytes_read["decode"]["disk"] > 0
        else:
            # with room for everything each expert is read from disk exactly once
            used = sum(1 for layer in stats.layers for c in layer.slots if c)
            assert stats.disk_bytes_total == used * expert_bytes(family)
    finally:
        handle.detach(restore_weights=False)


def test_loading_reads_no_expert_and_keeps_only_non_expert_weights(checkpoints):
    ref = load_reference("qwen2_moe", checkpoints["qwen2_moe"])
    expert_total = sum(p.numel() * 4 for n, p in ref.named_parameters() if ".experts." in n)
    model = moe_patch.load_model(checkpoints["qwen2_moe"], dtype=torch.float32, expert_cache=expert_bytes("qwen2_moe"))
    handle = get_offload_handle(model)
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    all_params = sum(p.numel() * 4 for p in ref.parameters())
    assert resident == all_params - expert_total
    assert handle.stats.disk_bytes_total == 0  # nothing read before the first forward
    handle.detach()  # restores every expert from the checkpoint: the model is whole again
    ids = prompts(2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_on_cpu_the_host_budget_adds_ram_slots_and_each_expert_is_read_once(checkpoints, references):
    """A CPU-only run has one RAM tier when both tiers would hold the same bytes: nothing is copied from one
    RAM tier to another to compute it."""
    one = expert_bytes("mixtral")
    model = moe_patch.load_model(checkpoints["mixtral"], dtype=torch.float32, expert_cache=2 * one, host_cache=8 * one)
    handle = get_offload_handle(model)
    assert torch.equal(greedy(model, prompts(4), NEW), references["mixtral"][4])
    engine, st = handle.engine, handle.stats
    assert engine.merged and engine.dev.capacity == 8  # 10 experts of budget, 2 layers x 4 experts exist
    assert st.disk_bytes_total == 8 * one  # each read once
    assert engine.dev.peak <= 10 * one and sum(layer.hits["host"] for layer in st.layers) == 0


def _bf16_checkpoint(family: str, path):
    """A bf16 checkpoint computed in fp32: experts stay bf16 in the host tier and are cast where computed."""
    from tests.helpers.offload import build

    build(family).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("policy", ["lfu", "pinned-hot"])
def test_other_policies_give_the_same_tokens(policy, checkpoints, references):
    opts = moe_patch.offload.OffloadOptions(
        expert_cache=3 * expert_bytes("qwen3_moe"), policy=policy, hot_experts=((0, 0), (1, 1))
    )
    model = moe_patch.load_model(checkpoints["qwen3_moe"], dtype=torch.float32, options=opts)
    assert torch.equal(greedy(model, prompts(4), NEW), references["qwen3_moe"][4])
    assert get_offload_handle(model).engine.dev.peak <= 3 * expert_bytes("qwen3_moe")


def test_cpu_compute_of_host_resident_misses_is_exact(tmp_path):
    # On a GPU machine the cost model sends some misses to the CPU; "always" forces that path here, where a
    # bf16 checkpoint computed in fp32 keeps bf16 copies in the host tier and fp32 experts in the slots.
    path = _bf16_checkpoint("deepseek_v3", tmp_path / "ds")
    ref = greedy(load_reference("deepseek_v3", path), prompts(4), NEW)
    one = expert_bytes("deepseek_v3")
    opts = moe_patch.offload.OffloadOptions(
        expert_cache=one, host_cache=16 * one, cpu_compute="always", device_format="dequantized"
    )
    model = moe_patch.load_model(path, dtype=torch.float32, options=opts)
    handle = get_offload_handle(model)
    assert torch.equal(greedy(model, prompts(4), NEW), ref)
    assert not handle.engine.merged and sum(layer.cpu_computed for layer in handle.stats.layers) > 0


def test_prefetch_off_gives_same_tokens_and_issues_nothing(checkpoints, references):
    model = moe_patch.load_model(
        checkpoints["gpt_oss"], dtype=torch.float32, prefetch=False, expert_cache=2 * expert_bytes("gpt_oss")
    )
    assert torch.equal(greedy(model, prompts(1), NEW), references["gpt_oss"][1])
    st = get_offload_handle(model).stats
    assert st.prefetch_issued == 0 and st.layers[1].predicted == 0


def test_prefetch_predictions_are_scored(checkpoints):
    model = moe_patch.load_model(checkpoints["mixtral"], dtype=torch.float32, expert_cache=3 * expert_bytes("mixtral"))
    greedy(model, prompts(1), NEW)
    st = get_offload_handle(model).stats
    assert st.prefetch_issued > 0
    assert 0 < st.prefetch_precision <= 1 and 0 < st.prefetch_recall <= 1
    assert st.layers[0].predicted == 0  # nothing predicts the first layer


def test_patch_an_already_loaded_model_and_detach_restores_it(checkpoints, references):
    from moe_patch.offload import attach_offload

    model = load_reference("module_list", checkpoints["module_list"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = attach_offload(model, None, {"expert_cache": expert_bytes("module_list")})
    assert all(p.numel() == 0 for n, p in model.named_parameters() if ".experts." in n)
    assert torch.equal(greedy(model, prompts(4), NEW), references["module_list"][4])
    handle.detach()
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(greedy(model, prompts(1), NEW), references["module_list"][1])


def test_peft_wrapped_offloaded_model_generates(checkpoints, references):
    peft = pytest.importorskip("peft")
    model = moe_patch.load_model(
        checkpoints["qwen3_moe"], dtype=torch.float32, expert_cache=2 * expert_bytes("qwen3_moe")
    )
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA's B starts at zero, so the adapter leaves the function unchanged
    assert torch.equal(greedy(wrapped, prompts(1), NEW), references["qwen3_moe"][1])


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_cache_reports_logit_error_against_full_precision(kind, checkpoints):
    one = expert_bytes("mixtral")
    # half an fp32 expert: too small unquantized, enough for nf4/int8 experts
    model = moe_patch.load_model(
        checkpoints["mixtral"], dtype=torch.float32, expert_cache=one // 2, quantize_experts=kind
    )
    handle = get_offload_handle(model)
    err = handle.quantization_error(prompts(2, length=12))
    assert 0 < err["max_rel"] < (0.05 if kind == "int8" else 0.3)
    assert err["top1_agreement"] > 0.7
    out = greedy(model, prompts(1), 8)
    assert out.shape == (1, 6 + 8)
    assert handle.engine.dev.peak <= one // 2


def test_statistics_report_and_plot(checkpoints, tmp_path):
    model = moe_patch.load_model(
        checkpoints["qwen2_moe"], dtype=torch.float32, expert_cache=4 * expert_bytes("qwen2_moe")
    )
    greedy(model, prompts(1), 16)
    st = get_offload_handle(model).stats
    text = str(st)
    assert "hit rate" in text and "of the bound" in text and "binds" in text and "load-CV" in text
    assert "counted by the kernel" in text
    d = st.to_dict()
    times = d["decode_bound_by_resource"]
    assert set(times) <= {"memory", "disk"} and times["memory"] > 0  # a CPU run: DRAM, and the disk for misses
    assert d["non_expert_bytes"] > 0 and d["decode_bound_s"] == max(times.values())
    assert d["decode_tokens_per_s"] > 0 and len(d["layers"]) == 2
    assert sum(d["layers"][0]["slots"]) == 2 * (6 + 15)  # top-2 slots of every token that went through
    with pytest.MonkeyPatch.context() as mp:  # without matplotlib: one line naming the install, no file
        mp.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(MoEPatchError, match="pip install matplotlib"):
            st.plot_utilisation(str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
    pytest.importorskip("matplotlib")
    png = st.plot_utilisation(str(tmp_path / "util.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_run_prints_statistics(checkpoints, capsys):
    from moe_patch.cli import main

    code = main(
        [
            "run",
            str(checkpoints["mixtral"]),
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "4",
            "--expert-cache",
            f"{expert_bytes('mixtral')}B",
            "--dtype",
            "float32",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "hit rate" in captured.err and "decode" in captured.err  # the statistics: stderr, not with the text
    assert len(captured.out.split()) == 4 and captured.out.count("\n") == 1  # stdout: the four generated token ids


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_cli_run_with_quantized_experts_reports_the_logit_error(kind, checkpoints, capsys):
    """As the README promises: `--quantize` says what it cost, measured on the generated sequence against
    full-precision experts read from the checkpoint (text and --json)."""
    import json

    from moe_patch.cli import main

    argv = [
        "run",
        str(checkpoints["mixtral"]),
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--expert-cache",
        f"{expert_bytes('mixtral')}B",
        "--quantize",
        kind,
    ]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith(f"{kind} experts: logit error"))
    assert "of the largest logit" in line and "top-1 agreement" in line
    assert main([*argv, "--json"]) == 0
    error = json.loads(capsys.readouterr().out)["quantization_error"]
    assert error["format"] == kind and 0 < error["max_rel"] < 0.3 and 0 < error["top1_agreement"] <= 1
    assert error["tokens"] == 3 + 4


def test_cli_run_quantized_prints_no_warning_about_a_kernel_it_does_not_use(checkpoints):
    """bitsandbytes' CPU backend (on AVX512-BF16 CPUs) warns at import that it cannot fetch a fused 4-bit GEMV
    kernel from the Hub; moe-patch never calls that op (it dequantizes, then multiplies in torch)."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("moe-patch")),
            "run",
            str(checkpoints["mixtral"]),
            "--prompt-ids",
            "5,6",
            "--max-new-tokens",
            "2",
            "--quantize",
            "nf4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr and "nf4 experts: logit error" in proc.stderr


def test_bf16_checkpoint_computed_in_fp32_matches_transformers_upcast(tmp_path):
    path = _bf16_checkpoint("qwen3_moe", tmp_path / "bf16")
    ref = load_reference("qwen3_moe", path)  # transformers upcasts to fp32 at load
    # decoded device slots (the CPU kernels would read the bf16 bytes in place: tests/kernels)
    model = moe_patch.load_model(
        path,
        dtype=torch.float32,
        options=moe_patch.offload.OffloadOptions(
            expert_cache=3 * expert_bytes("qwen3_moe"),
            host_cache=8 * expert_bytes("qwen3_moe"),
            device_format="dequantized",
        ),
    )
    handle = get_offload_handle(model)
    assert torch.equal(greedy(model, prompts(4), 32), greedy(ref, prompts(4), 32))
    engine = handle.engine
    # the host tier holds the experts as stored (bf16, half the fp32 bytes), not fp32 copies
    assert engine.stored and handle.stats.stored_expert_bytes * 2 == handle.stats.expert_bytes
    assert len(engine.host) and all(
        engine.host._entries[k].nbytes == handle.stats.stored_expert_bytes for k in engine.host.keys()
    )
    assert handle.stats.stored_format.startswith("bfloat16")


def test_patch_model_offload_option_and_unpatch(checkpoints, references):
    model = load_reference("qwen2_moe", checkpoints["qwen2_moe"])
    report = moe_patch.patch_model(model, offload={"expert_cache": 2 * expert_bytes("qwen2_moe")})
    assert report.offload.stats is get_offload_handle(model).stats
    assert torch.equal(greedy(model, prompts(4), NEW), references["qwen2_moe"][4])
    assert moe_patch.unpatch_model(model)
    assert get_offload_handle(model) is None
    assert torch.equal(greedy(model, prompts(1), NEW), references["qwen2_moe"][1])


def test_inclusive_tiers_keep_compact_host_copies_and_stay_exact(tmp_path):
    # On CUDA, and on CPU when the slots hold decoded copies, the host tier keeps a copy of what it promotes
    # (the slot's copy is dropped on eviction).
    path = _bf16_checkpoint("mixtral", tmp_path / "m")
    ref = greedy(load_reference("mixtral", path), prompts(4), NEW)
    one = expert_bytes("mixtral")  # fp32
    model = moe_patch.load_model(
        path,
        dtype=torch.float32,
        options=moe_patch.offload.OffloadOptions(expert_cache=2 * one, host_cache=2 * one, device_format="dequantized"),
    )
    engine = get_offload_handle(model).engine
    assert torch.equal(greedy(model, prompts(4), NEW), ref)
    assert not engine.merged and engine.host.peak <= 2 * one and engine.dev.peak <= 2 * one
    assert len(engine.host) == 4  # 2 fp32 experts of budget hold 4 bf16 ones; every promotion left its copy
    assert sum(layer.hits["host"] for layer in engine.stats.layers) > 0


def test_prefetch_leaves_host_resident_misses_to_the_cpu_when_asked(tmp_path):
    """Early device reads must not pre-empt computing a host-resident miss where it lies."""
    from moe_patch.offload import OffloadOptions, get_offload_handle

    path = _bf16_checkpoint("qwen3_moe", tmp_path / "q")
    one = expert_bytes("qwen3_moe")
    ref = greedy(load_reference("qwen3_moe", path), prompts(1), 32)
    model = moe_patch.load_model(
        path,
        dtype=torch.float32,
        options=OffloadOptions(
            expert_cache=4 * one, host_cache=16 * one, cpu_compute="always", prefetch=True, device_format="dequantized"
        ),
    )
    assert torch.equal(greedy(model, prompts(1), 32), ref)
    handle = get_offload_handle(model)
    assert sum(layer.cpu_computed for layer in handle.stats.layers) > 0
    handle.detach(restore_weights=False)


@pytest.mark.parametrize("budget", ["two_experts", "everything"])
def test_odd_expert_widths_offloaded_run_where_the_grouped_kernel_cannot(budget, tmp_path):
    """An expert width of 37 fp32 values breaks the grouped kernel's 16-byte strides: the engine's slot
    GEMM falls back to the loop, as the resident patched model does, and generates the same tokens."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.offload import config_for

    cfg = config_for("qwen3_moe")
    cfg.moe_intermediate_size = 37
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "odd")
    ref = AutoModelForCausalLM.from_pretrained(
        tmp_path / "odd", dtype=torch.float32, experts_implementation="eager"
    ).eval()
    expected = greedy(ref, prompts(2), 16)
    one = 3 * 37 * cfg.hidden_size * 4
    model = moe_patch.load_model(
        tmp_path / "odd", dtype=torch.float32, expert_cache=2 * one if budget == "two_experts" else None
    )
    try:
        assert torch.equal(greedy(model, prompts(2), 16), expected)
    finally:
        get_offload_handle(model).detach(restore_weights=False)


@pytest.mark.parametrize("policy", ["lru", "lfu", "pinned-hot"])
def test_every_eviction_policy_drives_both_tiers_end_to_end(policy, tmp_path):
    """One policy for the whole run: the device slots and the host tier both evict with it, through
    ``load_model``. A bf16 checkpoint computed in fp32 keeps the host tier on a CPU (slots hold decoded
    fp32 copies of the stored bf16 bytes), so both tiers fill and evict here."""
    import transformers

    from moe_patch.offload import OffloadOptions
    from tests.helpers.offload import build

    path = tmp_path / "bf16"
    build("qwen3_moe").to(torch.bfloat16).save_pretrained(path)
    resident = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    one = expert_bytes("qwen3_moe")  # fp32 bytes of one expert
    options = OffloadOptions(
        expert_cache=2 * one,
        host_cache=one,
        policy=policy,
        hot_experts=((0, 1), (1, 2)),
        calibrate=False,
        device_format="dequantized",
    )
    model = moe_patch.load_model(path, dtype=torch.float32, options=options)
    engine = get_offload_handle(model).engine
    assert not engine.merged  # the host tier keeps the stored bf16 copy of what the slots hold decoded
    assert torch.equal(greedy(model, prompts(1), 16), greedy(resident, prompts(1), 16))
    assert engine.host.policy.name == policy and {g.table.policy.name for g in engine.dev.groups} == {policy}
    assert engine.dev.evictions > 0 and engine.host.evictions > 0
    assert engine.dev.peak <= 2 * one and engine.host.peak <= one
