"""The one I/O floor (moe_patch.io): the shard index and its agreement with the shards, checked in one place
for every reader, and positional reads of blocks that equal safetensors' own slicing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_patch.errors import CheckpointError
from moe_patch.io import INDEX_NAME, Checkpoint, read_index, read_shards


def sharded(folder: Path) -> Path:
    """Two shards and their index: a.safetensors holds w1 and w2, b.safetensors holds w3."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w1": torch.arange(12.0).reshape(3, 4), "w2": torch.ones(2)}, folder / "a.safetensors")
    save_file({"w3": torch.zeros(5, dtype=torch.bfloat16)}, folder / "b.safetensors")
    index = {
        "metadata": {"total_size": 66},
        "weight_map": {"w1": "a.safetensors", "w2": "a.safetensors", "w3": "b.safetensors"},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return folder


def edit_index(folder: Path, change) -> None:
    data = json.loads((folder / INDEX_NAME).read_text())
    change(data)
    (folder / INDEX_NAME).write_text(json.dumps(data))


# -- the index ----------------------------------------------------------------------------------------------
def test_the_index_gives_each_tensor_its_shard_and_the_total_size(tmp_path):
    index = read_index(sharded(tmp_path) / INDEX_NAME)
    assert index.shards == ["a.safetensors", "b.safetensors"] and index.total_size == 66
    assert index.keys_by_shard() == {"a.safetensors": ["w1", "w2"], "b.safetensors": ["w3"]}
    headers = read_shards(index, complete=True)
    assert {shard: sorted(h) for shard, h in headers.items()} == {
        "a.safetensors": ["w1", "w2"],
        "b.safetensors": ["w3"],
    }


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": [1]}', '{"weight_map": {"w1": 3}}'])
def test_a_malformed_index_is_named(tmp_path, text):
    (tmp_path / INDEX_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: malformed safetensors index"):
        read_index(tmp_path / INDEX_NAME)


def test_a_total_size_that_is_not_an_integer_is_unknown_not_an_error(tmp_path):
    folder = sharded(tmp_path)
    edit_index(folder, lambda d: d.update(metadata={"total_size": True}))
    assert read_index(folder / INDEX_NAME).total_size is None


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda f: (f / "b.safetensors").unlink(),
            r"shard b\.safetensors listed in model\.safetensors\.index\.json is missing "
            r"\(b\.safetensors holds 'w3' and 0 more tensors\)\. Fix it\.",
        ),
        (
            lambda f: edit_index(f, lambda d: d["weight_map"].update(w9="a.safetensors")),
            r"a\.safetensors: tensor 'w9' is listed in model\.safetensors\.index\.json but absent from the shard "
            r"\(1 such tensors\)\. Fix it\.",
        ),
    ],
)
def test_the_index_and_its_shards_must_agree(tmp_path, change, message):
    folder = sharded(tmp_path)
    change(folder)
    with pytest.raises(CheckpointError, match=message):
        read_shards(read_index(folder / INDEX_NAME), advice="Fix it.")


def test_a_complete_index_lists_every_tensor_of_its_shards(tmp_path):
    folder = sharded(tmp_path)
    edit_index(folder, lambda d: d["weight_map"].pop("w2"))
    read_shards(read_index(folder / INDEX_NAME))  # loaders read through the index: an extra tensor is harmless
    with pytest.raises(CheckpointError, match=r"a\.safetensors: tensor 'w2' is in the shard but .* does not list it"):
        read_shards(read_index(folder / INDEX_NAME), complete=True)


def test_every_reader_refuses_a_broken_index_with_the_same_message(tmp_path):
    """Offload, upcycle and push read sharded checkpoints through the one check (inspect reads the index only)."""
    from converters.checkpoint import DenseCheckpoint
    from hub_scripts.push import check_checkpoint_files
    from moe_patch.detect.config import summarize_checkpoint

    folder = sharded(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4, "num_attention_heads": 1}))
    edit_index(folder, lambda d: d["weight_map"].update(ghost="b.safetensors"))
    said = []
    for read in (Checkpoint, DenseCheckpoint, check_checkpoint_files):
        with pytest.raises(CheckpointError) as info:
            read(folder)
        said.append(str(info.value).rsplit(". ", 1)[0])  # the advice differs: where the checkpoint came from
    assert len(set(said)) == 1 and "'ghost' is listed in model.safetensors.index.json but absent" in said[0]
    (folder / INDEX_NAME).write_text("[]")
    for read in (Checkpoint, DenseCheckpoint, check_checkpoint_files, summarize_checkpoint):
        with pytest.raises(CheckpointError, match="malformed safetensors index"):
            read(folder)


# -- positional reads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool])
@pytest.mark.parametrize(
    "rows, cols",
    [
        (None, None),
        (slice(1, 4), None),
        (None, slice(2, 5)),
        (slice(3, 6), slice(0, 1)),
        (slice(4, 99), None),
        (slice(5, 2), slice(1, 3)),
        (None, slice(6, 6)),
    ],
)
def test_a_block_read_equals_safetensors_own_slice(tmp_path, dtype, rows, cols):
    tensor = (torch.arange(6 * 7 * 2) % 5).reshape(6, 7, 2).to(dtype)
    save_file({"x": tensor}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        sl = f.get_slice("x")
        expected = sl[:] if rows is None and cols is None else sl[rows or slice(None), cols or slice(None)]
    got = ckpt.read_block(ckpt.entries["x"], rows, cols)
    ckpt.close()
    assert got.dtype == dtype and got.shape == expected.shape and torch.equal(got, expected)


def test_a_block_of_columns_reads_only_its_bytes(tmp_path, monkeypatch):
    save_file({"x": torch.zeros(8, 100)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    read = []
    original = Checkpoint.read_bytes
    monkeypatch.setattr(
        Checkpoint, "read_bytes", lambda self, e, s, t, out=None: read.append(t - s) or original(self, e, s, t, out)
    )
    assert ckpt.read_block(ckpt.entries["x"], cols=slice(10, 20)).shape == (8, 10)
    assert read == [10 * 4] * 8  # one read per row, of the 10 columns only
