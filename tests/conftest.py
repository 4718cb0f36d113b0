"""Shared fixtures. Every model here is tiny, random and built locally: nothing is downloaded."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

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
