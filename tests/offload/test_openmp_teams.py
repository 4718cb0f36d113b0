"""One OpenMP team per process: threads moe-patch starts must not give libgomp more threads than CPUs, or every
parallel region (torch's and the kernels') pays an OS wake-up (moe_patch/threads.py)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_patch import threads

needs_runtime = pytest.mark.skipif(threads._openmp() is None, reason="torch runs on no known OpenMP runtime here")
linux_tasks = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")


def _parallel_copy() -> int:
    """A copy large enough for torch to run it as an OpenMP parallel region; returns this thread's team size."""
    src = torch.ones(1 << 22)
    torch.empty_like(src).copy_(src + 1)
    return torch.get_num_threads()


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@needs_runtime
def test_a_serial_worker_runs_torch_without_a_team_and_leaves_other_threads_alone():
    torch.set_num_threads(2)
    default = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=threads.serial_worker) as pool:
        assert pool.submit(_parallel_copy).result() == 1
    assert torch.get_num_threads() == default  # the calling thread's team size is its own
    seen: list[int] = []
    plain = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    plain.start()
    plain.join()
    assert seen == [default]  # new threads still get the process default


@needs_runtime
@linux_tasks
def test_a_serial_worker_starts_no_openmp_threads():
    torch.set_num_threads(2)  # (the suite's fixture sets 1 and restores it afterwards)
    _parallel_copy()  # the main thread's own team exists first
    both = threading.Barrier(2)

    def copy_in_both() -> int:
        both.wait()  # each of the pool's two threads takes one
        return _parallel_copy()

    with ThreadPoolExecutor(2, initializer=threads.serial_worker) as pool:
        both_started = [pool.submit(both.wait) for _ in range(2)]
        [f.result() for f in both_started]
        before = _os_threads()
        for _ in range(3):
            assert [f.result() for f in [pool.submit(copy_in_both) for _ in range(2)]] == [1, 1]
        assert _os_threads() == before  # no OpenMP workers joined


@needs_runtime
@linux_tasks
def test_releasing_the_idle_team_ends_its_workers_and_the_thread_still_computes():
    torch.set_num_threads(2)
    _parallel_copy()
    before = _os_threads()
    assert threads.release_idle_team()
    assert _os_threads() < before
    x = torch.arange(1 << 22, dtype=torch.float64)
    assert (x + 1).sum().item() == pytest.approx((1 << 22) * ((1 << 22) + 1) / 2)  # a new team, same answer
    assert torch.get_num_threads() == 2


def test_without_a_known_runtime_both_do_nothing(monkeypatch):
    monkeypatch.setattr(threads, "_openmp", lambda: None)
    threads.serial_worker()
    assert threads.release_idle_team() is False


@needs_runtime
def test_the_offload_engines_readers_copy_without_a_team(tmp_path):
    import moe_patch
    from moe_patch.offload import get_offload_handle
    from tests.helpers.offload import expert_bytes, prompts, save_tiny

    torch.set_num_threads(2)  # (a thread started under the suite's 1 would get 1 anyway)
    path = save_tiny("qwen3_moe", tmp_path / "m")
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=4 * expert_bytes("qwen3_moe"))
    with torch.no_grad():
        model(prompts(2))
    engine = get_offload_handle(model).engine
    worker = engine.prefetcher._worker
    assert worker is not None, "the default options read ahead"
    assert worker.submit(torch.get_num_threads).result() == 1


def test_generation_handed_to_a_worker_thread_starts_after_the_caller_lets_its_team_go(monkeypatch):
    """``moe-patch run`` generates on a worker thread (Ctrl-C stays on the main one): the main thread's idle
    team, left from loading the model, goes first, so the worker's is the only one."""
    from moe_patch.cli import streaming

    order: list[str] = []
    monkeypatch.setattr(streaming, "release_idle_team", lambda: order.append("released") or True)

    class Model:
        def generate(self, input_ids, **kwargs):
            order.append(threading.current_thread().name)
            return input_ids

    ids = torch.tensor([[1, 2]])
    assert streaming.generate_interruptibly(Model(), ids, None, None).sequence is ids
    assert order == ["released", "moe-patch-generate"]
