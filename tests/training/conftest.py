"""Fixtures of the distributed training tests: a tiny upcycled MoE, and runs of tests/training/twin_train.py under
one process or ``torchrun --nproc_per_node 2`` (gloo on CPU, loopback only), each run once per session."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: lines of a failed launch worth showing beside its last 30 (a rank's traceback, a C++ abort)
_ERROR_LINE = re.compile(r"Error|error:|Traceback|terminate called|what\(\)|Aborted|Assertion")
TWIN = HERE / "twin_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    script: Path, args: list[str], *, procs: int, launcher: str = "torchrun", timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run ``script`` in one process, or with ``procs`` processes on 127.0.0.1 (gloo over loopback) under torchrun
    or ``accelerate launch``; fail with the tail of its output when it exits non-zero."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, str(script), *args]
    if procs > 1 and launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(script),
            *args,
        ]
    elif procs > 1:  # --multi_gpu: without it accelerate starts one process on a machine without GPUs
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(procs),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(free_port()),
            str(script),
            *args,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # a child's own error comes before torchrun's summary of the ranks: keep both
        cause = [line for line in lines[:-30] if _ERROR_LINE.search(line)][-20:]
        tail = "\n".join(cause + ["..."] * bool(cause) + lines[-30:])
        pytest.fail(f"{' '.join(cmd[-len(args) - 1 :])} exited {proc.returncode}:\n{tail}")
    return proc


@pytest.fixture(scope="session")
def launch_script():
    """:func:`launch`, for tests that run a script of their own."""
    return launch


@pytest.fixture(scope="session")
def upcycled_moe(tmp_path_factory) -> Path:
    """A 2-layer Mixtral (4 experts, top-2) upcycled from a small random Llama, with noise so experts differ and
    the router's choices matter to the loss."""
    from converters import UpcycleConfig, upcycle
    from moe_patch.training import small_dense_llama

    work = tmp_path_factory.mktemp("upcycled")
    small_dense_llama(128, hidden=32, layers=2, head_dim=16).save_pretrained(work / "dense")
    upcycle(work / "dense", work / "moe", UpcycleConfig(num_experts=4, top_k=2, noise=0.05))
    return work / "moe"


@pytest.fixture(scope="session")
def twin(upcycled_moe, tmp_path_factory):
    """``twin(name, procs=1, **options)`` -> (process 0's result, [each process's own record]); cached by name."""
    runs: dict[str, tuple[dict, list[dict]]] = {}

    def run(name: str, *, procs: int = 1, **options) -> tuple[dict, list[dict]]:
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            args = ["--model", str(upcycled_moe), "--out", str(out)]
            for key, value in options.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
            launch(TWIN, args, procs=procs)
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
            runs[name] = (json.loads((out / "result.json").read_text()), ranks)
        return runs[name]

    return run
