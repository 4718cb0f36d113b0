"""Reads past the page cache (moe_patch.io.direct): the same bytes as a buffered read at any offset and length, a
file system without O_DIRECT falls back to the page cache, and the rule that turns them on for an offload run."""

from __future__ import annotations

import errno
import json
import logging
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import moe_patch
from moe_patch.errors import CheckpointError, MoEConfigError
from moe_patch.io import Checkpoint, direct
from moe_patch.offload import OffloadOptions, get_offload_handle
from tests.helpers.offload import build, greedy, prompts


@pytest.fixture
def big_file(tmp_path):
    """A 3 MiB + 5 byte tensor after a header of arbitrary length: no offset in it is aligned by construction."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (3 * 2**20 + 5,), dtype=torch.uint8, generator=gen)
    tensors = {"odd_name_to_shift_the_header": data, "tail": torch.arange(7, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "m.safetensors")
    return tmp_path, data


def _direct_works(folder) -> bool:
    try:
        os.close(direct.open_direct(folder / "m.safetensors"))
    except direct.DirectIOUnsupported:
        return False
    return True


@pytest.mark.parametrize("start, length", [(0, 2**20), (1, 2**20 + 3), (4095, 2**21), (3 * 2**20 + 5 - 2**20, 2**20)])
def test_a_direct_read_gives_the_bytes_a_buffered_read_gives(big_file, start, length):
    folder, data = big_file
    if not _direct_works(folder):
        pytest.skip("this file system refuses O_DIRECT")
    ckpt = Checkpoint(folder)
    entry = ckpt.entries["odd_name_to_shift_the_header"]
    ckpt.direct = True
    got = ckpt.read_bytes(entry, entry.start + start, entry.start + start + length)
    assert ckpt.direct and torch.equal(got, data[start : start + length])
    assert torch.equal(ckpt.read(entry), data)  # the whole tensor, into a fresh buffer
    out = torch.empty(length, dtype=torch.uint8)
    assert ckpt.read_bytes(entry, entry.start + start, entry.start + start + length, out=out) is out
    assert torch.equal(out, data[start : start + length])


def test_a_file_system_without_o_direct_reads_through_the_page_cache(big_file, monkeypatch, caplog):
    folder, data = big_file

    def refuse(path):
        raise direct.DirectIOUnsupported(errno.EINVAL, "refused here")

    monkeypatch.setattr("moe_patch.io.checkpoint.open_direct", refuse)
    ckpt = Checkpoint(folder)
    ckpt.direct = True
    with caplog.at_level(logging.INFO, logger="moe_patch.io.checkpoint"):
        assert torch.equal(ckpt.read(ckpt.entries["odd_name_to_shift_the_header"]), data)
    assert not ckpt.direct and "reading through the page cache" in caplog.text


def test_a_shard_cut_short_is_still_one_clear_error_with_direct_reads(big_file):
    folder, _ = big_file
    ckpt = Checkpoint(folder)
    entry = ckpt.entries["odd_name_to_shift_the_header"]
    ckpt.direct = True
    with open(folder / "m.safetensors", "r+b") as fh:
        fh.truncate(entry.start + 2**20)
    with pytest.raises(CheckpointError, match="cut short"):
        ckpt.read(entry)


@pytest.mark.parametrize(
    "mode, experts, room, want",
    [
        ("auto", 10, 5, True),
        ("auto", 5, 10, False),
        ("auto", 10, None, False),
        ("always", 1, 10, True),
        ("never", 10, 1, False),
    ],
)
def test_direct_reads_are_chosen_when_the_page_cache_could_not_keep_the_experts(mode, experts, room, want):
    assert direct.use_direct_reads(mode, experts, room) is want


def test_the_page_cache_room_is_a_byte_count_here():
    room = direct.page_cache_room()
    assert room is None or (isinstance(room, int) and room >= 0)


def test_an_unknown_direct_io_mode_is_one_clear_error():
    with pytest.raises(MoEConfigError, match="direct_io='sometimes'"):
        OffloadOptions(direct_io="sometimes")


def test_an_offload_run_reading_past_the_page_cache_generates_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr("moe_patch.io.checkpoint.MIN_DIRECT_BYTES", 0)  # the tiny model's experts are a few KiB
    path = tmp_path / "mixtral"
    build("mixtral").save_pretrained(path)
    runs = {}
    for mode in ("never", "always"):
        options = OffloadOptions(expert_cache="64KiB", direct_io=mode)  # a few experts: most steps read from disk
        model = moe_patch.load_model(path, dtype=torch.float32, options=options)
        checkpoint = get_offload_handle(model).engine.source.cmap.checkpoint
        assert checkpoint.direct == (mode == "always" and _direct_works_for(checkpoint))
        runs[mode] = greedy(model, prompts(2), 16)
        stats = get_offload_handle(model).stats
        assert stats.to_dict()["direct_reads"] is checkpoint.direct  # the statistics say which reads ran
        assert ("disk reads (past the page cache):" in str(stats)) is checkpoint.direct
    assert torch.equal(runs["always"], runs["never"])


def _direct_works_for(checkpoint: Checkpoint) -> bool:
    try:
        os.close(direct.open_direct(next(iter(checkpoint.entries.values())).file))
    except direct.DirectIOUnsupported:
        return False
    return True


def test_reads_into_a_buffer_go_through_one_bounded_aligned_buffer_per_thread(big_file, monkeypatch):
    folder, data = big_file
    if not _direct_works(folder):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(direct, "KEEP_BYTES", 1 << 20)  # a 3 MiB read goes through it in segments
    reader, fd = direct.DirectReader(), direct.open_direct(folder / "m.safetensors")
    try:
        entry = Checkpoint(folder).entries["odd_name_to_shift_the_header"]
        for start, n in ((0, 3 * 2**20), (5, 2**19), (3, 3 * 2**20 + 2)):
            out = torch.empty(n, dtype=torch.uint8)
            got, have = reader.read(fd, entry.start + start, n, out)
            assert got is out and have == n and torch.equal(out, data[start : start + n])
            assert reader._local.buf.numel() <= (1 << 20) + direct.ALIGN
        out = torch.empty(2**20, dtype=torch.uint8)  # past the end of the file: what is there, and how much
        got, have = reader.read(fd, entry.end - 100, 2**20, out)
        assert have == 100 + 7 and torch.equal(out[:100], data[-100:])  # the 7-byte tensor follows
    finally:
        os.close(fd)


def test_a_tensor_read_without_a_buffer_can_be_viewed_in_its_dtype_at_any_offset(tmp_path):
    b = torch.randn(2**18, generator=torch.Generator().manual_seed(1)).double()
    header = {  # written by hand: safetensors' own writer puts 8-byte tensors first, aligned
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F64", "shape": [b.numel()], "data_offsets": [3, 3 + 8 * b.numel()]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    raw = struct.pack("<Q", len(text)) + text + bytes([0, 1, 2]) + b.numpy().tobytes()
    (tmp_path / "m.safetensors").write_bytes(raw)  # b starts 3 bytes after a: not 8-aligned in the file
    tensors = {"b": b}
    if not _direct_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    ckpt = Checkpoint(tmp_path)
    ckpt.direct = True
    assert ckpt.entries["b"].start % 8 != 0
    assert torch.equal(ckpt.read(ckpt.entries["b"]), tensors["b"])


def _cgroup_tree(root, proc_line: str, groups: dict[str, dict[str, str]]):
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(proc_line + "\n")
    for rel, files in groups.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text)


def test_the_cgroup_room_is_the_tightest_over_the_group_and_its_ancestors_v2(tmp_path):
    _cgroup_tree(
        tmp_path,
        "0::/jobs/run",
        {
            "sys/fs/cgroup/jobs": {
                "memory.max": "1000\n",
                "memory.current": "700\n",
                "memory.stat": "inactive_file 100\n",
            },
            "sys/fs/cgroup/jobs/run": {"memory.max": "max\n", "memory.current": "600\n", "memory.stat": "anon 600\n"},
        },
    )
    # the group itself has no limit; its parent has 1000 - (700 - 100 reclaimable) left
    assert direct._cgroup_room(tmp_path) == 400


def test_the_cgroup_room_reads_v1s_hierarchical_limit_and_a_container_root(tmp_path):
    stat = "hierarchical_memory_limit 5000\ntotal_inactive_file 1000\n"
    # inside a container the group's own path is not there: its cgroup is mounted at the controller's root
    _cgroup_tree(
        tmp_path,
        "4:memory:/docker/abc",
        {
            "sys/fs/cgroup/memory": {
                "memory.limit_in_bytes": "9223372036854771712\n",
                "memory.usage_in_bytes": "3000\n",
                "memory.stat": stat,
            }
        },
    )
    assert direct._cgroup_room(tmp_path) == 5000 - (3000 - 1000)


def test_no_cgroup_limit_leaves_the_room_to_the_machine(tmp_path):
    _cgroup_tree(tmp_path, "0::/", {"sys/fs/cgroup": {"memory.max": "max\n", "memory.current": "10\n"}})
    assert direct._cgroup_room(tmp_path) is None
