"""Fixtures shared by every folder: the environment of the run (offline, per-run calibration cache, one thread,
seed 0), the --live option, and the loopback Hub (tests/helpers/hub_server.py) that the hub, cli, offload and e2e
tests publish to and download from. Every model here is tiny, random and built locally: nothing is downloaded."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.hub_server import TOKEN, HubServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# machine calibrations (which kernel is fastest here) go to a per-run folder, not the user's cache
if "MOE_PATCH_CACHE" not in os.environ:
    os.environ["MOE_PATCH_CACHE"] = tempfile.mkdtemp(prefix="moe-patch-calibration-")
    atexit.register(shutil.rmtree, os.environ["MOE_PATCH_CACHE"], True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--live", action="store_true", help="run tests marked `live` (real Hugging Face Hub)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--live"):
        return
    skip = pytest.mark.skip(reason="talks to the real Hub; run with --live and a token")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention
    (a tiny F.linear took 4.4 ms instead of 18 us with two busy threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# -- the loopback Hub ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A tiny Mixtral checkpoint (4 experts, top-2, 2 layers) saved as 3 safetensors shards with an index."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-moe"
    model.save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) == 3
    return path


@pytest.fixture
def ckpt(tiny_moe_dir, tmp_path) -> Path:
    """A fresh copy of the tiny checkpoint, free to modify."""
    dst = tmp_path / "tiny-moe"
    shutil.copytree(tiny_moe_dir, dst)
    return dst


@pytest.fixture
def hub_online(tmp_path, monkeypatch):
    """Let huggingface_hub make requests (the suite sets HF_HUB_OFFLINE=1); caches and token file in tmp_path.

    Only loopback servers and closed local ports are ever contacted by the tests that use it.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))


@pytest.fixture
def hub(tmp_path, monkeypatch, hub_online):
    """A running loopback Hub; HF_ENDPOINT and HF_TOKEN point at it, caches live in tmp_path, xet is off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(tmp_path / "server", token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture
def api(hub):
    """An HfApi built the way the CLI builds it (endpoint and token from the environment)."""
    from hub_scripts.api import make_api

    return make_api()


@pytest.fixture
def xet_hub(hub, tmp_path, monkeypatch):
    """The loopback Hub with the client's xet path on (its default in production): uploads go to the CAS routes.

    hf_xet's cache and logs go to tmp_path, and a fresh xet session picks that configuration up.
    """
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))
    monkeypatch.setenv("HF_XET_LOG_DEST", str(tmp_path / "xet-logs"))  # hf_xet logs from its import on
    pytest.importorskip("hf_xet")
    from huggingface_hub import constants
    from huggingface_hub.utils import _xet

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(_xet, "_GLOBAL_XET_HOLDER", _xet.XetSessionHolder())
    yield hub
