"""Building, probing and falling back: the compiled path runs where the probe says it can, a CPU that lacks
an instruction kills only the probe's child, and no compiler / turned off / a broken build is one log line
and a clean "not available" (callers keep torch)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from moe_patch.kernels import ExpertFormat, KernelUnavailableError, MoEKernel, MoELayerSpec
from moe_patch.kernels import build as kbuild
from moe_patch.kernels import layer as klayer
from moe_patch.kernels import probe as kprobe
from moe_patch.kernels.library import KernelRegistry
from tests.kernels.conftest import kernels_expected
from tests.kernels.kernel_reference import make_experts
from tests.kernels.test_kernel_formats import build, routing


def fresh(monkeypatch, tmp_path, **env) -> KernelRegistry:
    """A registry of its own, with ``env`` set (None: unset) and, unless given, the session's cache."""
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return KernelRegistry()


def test_the_compiled_path_runs_where_the_probe_passes(kernel_status, gen):
    assert kernel_status.available and kernel_status.variants
    assert all(kernel_status.probe[v] == "ok" for v in kernel_status.variants)
    spec = MoELayerSpec(2, 64, 32, ExpertFormat("bf16"), ExpertFormat("bf16"))
    layer = build(spec, make_experts(spec, gen))
    idx, wts = routing(3, 1, 2, gen)
    layer.forward(torch.randn(3, 64).bfloat16(), idx, wts)
    assert layer.last_variant == kernel_status.variants[0]  # the best variant the probe passed, not torch
    layer.forward(torch.randn(3, 64), idx, wts)
    assert layer.last_variant == next(v for v in kernel_status.variants if v != "avx512bf16")


def test_one_openmp_runtime_shared_with_torch(kernel_status):
    """The library binds to torch's libgomp.so.1 instead of loading a second OpenMP runtime."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_an_illegal_instruction_kills_only_the_probe(monkeypatch, tmp_path):
    monkeypatch.setattr(kprobe, "_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    assert kprobe.run_probes(tmp_path / "none.so", ["avx512bf16"]) == {"avx512bf16": "killed by SIGILL"}
    monkeypatch.setattr(kprobe, "_CHILD", "import sys; sys.exit(2)")
    assert kprobe.run_probes(tmp_path / "none.so", ["avx2"]) == {"avx2": "self-test check 2 failed"}


def test_probe_results_are_kept_per_cpu(kernel_status, monkeypatch):
    def no_probe(*a):
        raise AssertionError("probed again")

    monkeypatch.setattr(kprobe, "run_probes", no_probe)
    assert kprobe.probe(Path(kernel_status.library), list(kernel_status.probe)) == kernel_status.probe


def test_no_compiler_is_one_line_and_a_clean_refusal(monkeypatch, tmp_path, caplog):
    reg = fresh(monkeypatch, tmp_path, CC="/nonexistent/bin/cc", MOE_PATCH_KERNELS=None, MOE_PATCH_CACHE=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="moe_patch.kernels"):
        st = reg.status()
        reg.status()  # asked again: no second line
    assert not st.available and "no C compiler" in st.reason
    lines = [r for r in caplog.records if r.name.startswith("moe_patch.kernels")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "not available" in lines[0].getMessage()
    monkeypatch.setattr(klayer, "KERNELS", reg)
    with pytest.raises(KernelUnavailableError, match="no C compiler"):
        MoEKernel(MoELayerSpec(2, 64, 32, ExpertFormat("bf16"), ExpertFormat("bf16")))


def test_turned_off_by_the_environment(monkeypatch, tmp_path):
    reg = fresh(monkeypatch, tmp_path, MOE_PATCH_KERNELS="0")
    assert not reg.status().available and "MOE_PATCH_KERNELS=0" in reg.status().reason
    monkeypatch.setattr(klayer, "KERNELS", reg)
    with pytest.raises(KernelUnavailableError, match="turned off"):
        MoEKernel(MoELayerSpec(2, 64, 32, ExpertFormat("bf16"), ExpertFormat("bf16")))
    for name, value, words in (
        ("MOE_PATCH_KERNELS", "maybe", "not one of 0, 1"),
        ("MOE_PATCH_KERNELS_ISA", "sse4", "not one of avx512bf16"),
    ):
        reg = fresh(monkeypatch, tmp_path, **{"MOE_PATCH_KERNELS": "1", "MOE_PATCH_KERNELS_ISA": None, name: value})
        assert not reg.status().available and words in reg.status().reason


@pytest.mark.skipif(not kernels_expected(), reason="no kernels on this machine")
def test_each_variant_can_be_forced(kernel_status, monkeypatch, tmp_path):
    for name in kernel_status.variants:
        reg = fresh(monkeypatch, tmp_path, MOE_PATCH_KERNELS_ISA=name)
        assert reg.status().variants[0] == name
        assert name not in reg.status().variants[1:]


def test_a_build_failure_is_one_line(monkeypatch, tmp_path, caplog):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    broken = tmp_path / "csrc"
    shutil.copytree(kbuild.CSRC, broken)
    (broken / "mp_kernels.c").write_text("this is not C\n")
    monkeypatch.setattr(kbuild, "CSRC", broken)
    reg = fresh(
        monkeypatch,
        tmp_path,
        MOE_PATCH_KERNEL_CACHE=str(tmp_path / "cache"),
        MOE_PATCH_KERNELS=None,
        MOE_PATCH_KERNELS_ISA=None,
    )
    with caplog.at_level(logging.WARNING, logger="moe_patch.kernels"):
        st = reg.status()
    assert not st.available and "failed to build" in st.reason and "\n" not in st.reason
    assert len(caplog.records) == 1
    assert not any((tmp_path / "cache").glob("*/*.so"))  # nothing half-built left as the library


def test_the_library_key_follows_the_sources(monkeypatch, tmp_path):
    compiler = kbuild.Compiler("/usr/bin/cc", "cc 1.0")
    before = kbuild.library_key(compiler)
    copy = tmp_path / "csrc"
    shutil.copytree(kbuild.CSRC, copy)
    with open(copy / "mp_kernels.c", "a") as f:
        f.write("\n/* changed */\n")
    monkeypatch.setattr(kbuild, "CSRC", copy)
    assert kbuild.library_key(compiler) != before
    assert kbuild.library_key(kbuild.Compiler("/usr/bin/cc", "cc 2.0")) != kbuild.library_key(compiler)
