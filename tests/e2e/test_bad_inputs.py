"""Every bad input gets one clear line and loses nothing.

Two tables of cases, one row per bad input: the input, the expected exit code (CLI, through the real
`moe-patch` console script in a subprocess) or exception type (library), a fragment the message must
contain, and a check that the inputs are unchanged and nothing partial is left next to them. The
classes of issue 11 are marked in the ids: push validates what it publishes (push-*), one config
validation for every entry point (config-*), arguments the code cannot use (arg-*), errors that name
the place (where-*), leftovers of killed runs (killed-*, below the tables), one size parser and one
byte formatter (size-*), and cases handled before (ok-*) so none regresses. Issue 19 adds: upcycle refuses a
source whose weights cannot make a right model (upcycle-*, upcycle-arg-*), untrusted text (text-*, and the
server's section below), and plots to paths that cannot be written (plot-*).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import moe_patch
from converters import VerificationError
from hub_scripts.errors import HubError
from moe_patch.errors import (
    BudgetError,
    CheckpointError,
    ExpertOutputError,
    InvalidArgumentError,
    MoEConfigError,
    MoEPatchError,
    NotAModelError,
    OutputError,
    RoutingError,
)
from tests.helpers.hub_server import TOKEN

MOE_PATCH = Path(sys.executable).with_name("moe-patch")  # the console script of this environment
INDEX = "model.safetensors.index.json"
UNITS = "KiB, MiB, GiB, TiB"  # every size error lists the accepted units


# -- inputs ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    from tests.helpers.upcycle import make_dense

    return make_dense(tmp_path_factory.mktemp("dense") / "dense", "llama")


@pytest.fixture
def work(tmp_path, tiny_moe_dir, dense_dir) -> Path:
    """A fresh folder holding `moe` (a tiny Mixtral, 3 shards and an index) and `dense` (a tiny Llama)."""
    shutil.copytree(tiny_moe_dir, tmp_path / "moe")
    shutil.copytree(dense_dir, tmp_path / "dense")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and folder under ``root``: a leftover, a change or a partial output shows."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
        if ".cache" not in p.parts
    }


def shard_of(folder: Path, key_part: str) -> tuple[Path, str]:
    """(shard file, tensor name) of the first tensor whose name contains ``key_part``."""
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    key = next(k for k in sorted(weight_map) if key_part in k)
    return folder / weight_map[key], key


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def rewrite_header(path: Path, fn: Callable[[dict], None]) -> None:
    """Change a safetensors header in place; the data bytes stay as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def truncate_expert_shard(work: Path) -> None:
    shard, _ = shard_of(work / "moe", ".experts.")
    os.truncate(shard, shard.stat().st_size - 64)


def append_to_expert_shard(work: Path) -> None:
    shard, _ = shard_of(work / "moe", ".experts.")
    with open(shard, "ab") as fh:
        fh.write(bytes(64))


def set_config(folder: str, **fields) -> Callable[[Path], None]:
    return lambda work: edit_json(work / folder / "config.json", lambda c: c.update(fields))


def drop_from_index(work: Path) -> None:
    _, key = shard_of(work / "moe", ".experts.")
    edit_json(work / "moe" / INDEX, lambda d: d["weight_map"].pop(key))


def add_ghost_to_index(work: Path) -> None:
    shard, _ = shard_of(work / "moe", ".experts.")
    edit_json(work / "moe" / INDEX, lambda d: d["weight_map"].update({"model.ghost.weight": shard.name}))


def unlink_a_shard(work: Path) -> None:
    shard_of(work / "moe", ".experts.")[0].unlink()


def shard_is_a_folder(work: Path) -> None:
    (work / "dense" / "model.safetensors").unlink()
    (work / "dense" / "model.safetensors").mkdir()


def a_file(name: str) -> Callable[[Path], None]:
    return lambda work: (work / name).write_text("not a folder\n")


def pickle_only(work: Path) -> None:
    (work / "dense" / "model.safetensors").rename(work / "dense" / "pytorch_model.bin")


def gguf_folder(work: Path) -> None:
    (work / "ggufs").mkdir()
    (work / "ggufs" / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))


def moe_pickles(work: Path) -> None:
    for shard in (work / "moe").glob("*.safetensors"):
        shard.rename(shard.with_suffix(".bin"))


def edit_tensors(folder: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite ``folder``'s single safetensors file after ``fn`` changed its tensors (name -> tensor)."""

    def prepare(work: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = work / folder / "model.safetensors"
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path, metadata={"format": "pt"})

    return prepare


def drop_tensor(folder: str, key: str) -> Callable[[Path], None]:
    return edit_tensors(folder, lambda t: t.pop(key))


def set_value(key: str, value: float, where: tuple[int, ...] = (0, 0)) -> Callable[[dict], None]:
    def fn(tensors: dict) -> None:
        tensors[key][where] = value

    return fn


def fill(key: str, value: float) -> Callable[[dict], None]:
    return lambda tensors: tensors[key].fill_(value)


def with_tokenizer(work: Path) -> None:
    """The word-level tokenizer (with a chat template) of the serving tests, saved next to the tiny MoE."""
    from tests.helpers.tokenizer import save_word_tokenizer

    save_word_tokenizer(work / "moe", 128)


def no_matplotlib(work: Path) -> None:
    shadow = work / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")


# -- the CLI table ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cli:
    id: str
    argv: tuple[str, ...]  # relative paths are inside the `work` folder
    code: int
    message: str
    prepare: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


CLI_CASES = [
    # 1. push validates every safetensors file before sending anything (--dry-run: no network needed)
    Cli("push-truncated-shard", ("push", "moe", "me/x", "--dry-run"), 1, "truncated", truncate_expert_shard),
    Cli(
        "push-inconsistent-moe-config",
        ("push", "moe", "me/x", "--dry-run"),
        1,
        "num_experts_per_tok = 8 exceeds num_local_experts = 4",
        set_config("moe", num_experts_per_tok=8),
    ),
    Cli(
        "push-config-field-of-the-wrong-type",
        ("push", "moe", "me/x", "--dry-run"),
        1,
        "transformers cannot read this config",
        set_config("moe", hidden_size="abc"),
    ),
    Cli(
        "push-shard-with-bytes-after-its-tensors",
        ("push", "moe", "me/x", "--dry-run"),
        1,
        "bytes follow the last tensor, which safetensors refuses",
        append_to_expert_shard,
    ),
    # 2. the same config validation on every entry point that reads a config
    Cli(
        "config-run-top-k-above-experts",
        ("run", "moe", "--prompt-ids", "1,2"),
        1,
        "num_experts_per_tok = 8 exceeds num_local_experts = 4",
        set_config("moe", num_experts_per_tok=8),
    ),
    Cli(
        "config-upcycle-field-of-the-wrong-type",
        ("upcycle", "dense", "out", "--num-experts", "4"),
        1,
        "expected int, got str",
        set_config("dense", hidden_size="abc"),
    ),
    # 3. arguments argparse would accept but the code cannot use: refused at the edge, with the range
    Cli(
        "arg-run-zero-new-tokens",
        ("run", "moe", "--prompt-ids", "1", "--max-new-tokens", "0"),
        2,
        "argument -n/--max-new-tokens: expected an integer >= 1, got 0",
    ),
    Cli("arg-demo-negative-tokens", ("demo", "--tokens", "-3"), 2, "argument --tokens: expected an integer >= 1"),
    Cli(
        "arg-run-prompt-id-outside-the-vocabulary",
        ("run", "moe", "--prompt-ids", "1,99999"),
        1,
        "token id 99999 is outside the vocabulary of moe: ids must lie in [0, 128)",
    ),
    Cli("arg-run-negative-prompt-id", ("run", "moe", "--prompt-ids", "3,-5"), 2, "token ids must be >= 0, got -5"),
    Cli("arg-run-no-prompt-ids", ("run", "moe", "--prompt-ids", " , "), 2, "expected at least one token id"),
    Cli(
        "arg-run-prompt-ids-not-integers", ("run", "moe", "--prompt-ids", "a,b"), 2, "expected comma-separated integers"
    ),
    Cli("arg-run-empty-prompt", ("run", "moe", "--prompt", ""), 2, "argument -p/--prompt: must not be empty"),
    Cli(
        "arg-run-unknown-dtype",
        ("run", "moe", "--prompt-ids", "1", "--dtype", "float33"),
        2,
        "invalid choice: 'float33' (choose from 'auto', 'float32', 'bfloat16', 'float16')",
    ),
    Cli("arg-run-integer-dtype", ("run", "moe", "--prompt-ids", "1", "--dtype", "int8"), 2, "invalid choice: 'int8'"),
    Cli(
        "arg-run-unknown-device",
        ("run", "moe", "--prompt-ids", "1", "--device", "tpu"),
        2,
        "expected auto, cpu, cuda or cuda:N, got 'tpu'",
    ),
    Cli(
        "arg-run-plot-folder-missing",
        ("run", "moe", "--prompt-ids", "1", "--plot", "no/such/folder/x.png"),
        2,
        "the folder no/such/folder does not exist",
    ),
    Cli(
        "arg-run-plot-without-matplotlib",
        ("run", "moe", "--prompt-ids", "1", "--plot", "x.png"),
        2,
        "plotting needs matplotlib: pip install matplotlib",
        no_matplotlib,
        {"PYTHONPATH": "shadow"},
    ),
    Cli(
        "arg-run-plot-unknown-format",
        ("run", "moe", "--prompt-ids", "1", "--plot", "x.doc"),
        2,
        "the suffix must be one of",
    ),
    Cli(
        "arg-pull-local-dir-is-a-file",
        ("pull", "me/x", "--local-dir", "notes.txt"),
        2,
        "argument --local-dir: notes.txt exists and is not a folder",
        a_file("notes.txt"),
    ),
    Cli(
        "arg-demo-out-is-a-file",
        ("demo", "--out", "notes.txt"),
        2,
        "notes.txt exists and is not a folder",
        a_file("notes.txt"),
    ),
    Cli(
        "arg-upcycle-zero-shard-size",
        ("upcycle", "dense", "out", "--num-experts", "4", "--max-shard-size", "0"),
        2,
        "it must be at least 1 B",
    ),
    Cli("arg-unknown-option", ("inspect", "moe", "--colour"), 2, "unrecognized arguments: --colour"),
    Cli("arg-no-prompt", ("run", "moe"), 2, "one of the arguments -p/--prompt -f/--file --prompt-ids is required"),
    # 4. errors that name the place
    Cli(
        "where-upcycle-shard-is-a-folder",
        ("upcycle", "dense", "out", "--num-experts", "4"),
        1,
        "dense/model.safetensors: cannot read the shard (Is a directory)",
        shard_is_a_folder,
    ),
    # 6. one size parser: the accepted units in every message
    Cli("size-expert-cache", ("run", "moe", "--prompt-ids", "1", "--expert-cache", "8GBs"), 2, UNITS),
    Cli("size-inspect-gpu-negative", ("inspect", "moe", "--gpu=-24GiB"), 2, "sizes cannot be negative"),
    Cli("size-max-shard-size", ("upcycle", "dense", "out", "--num-experts", "4", "--max-shard-size", "5XB"), 2, UNITS),
    # handled before: must stay so
    Cli(
        "ok-inspect-config-not-json",
        ("inspect", "moe"),
        1,
        "not valid JSON",
        lambda work: (work / "moe" / "config.json").write_text("{not json"),
    ),
    Cli("ok-pull-bad-repo-id", ("pull", "not a repo"), 1, "not a valid repository id"),
    # issue 19: upcycle refuses a source that cannot make a right model, with or without verification
    Cli(
        "upcycle-untied-head-missing-no-verify",
        ("upcycle", "dense", "out", "--num-experts", "4", "--no-verify"),
        1,
        "tensor 'lm_head.weight' is missing",
        set_config("dense", tie_word_embeddings=False),
    ),
    Cli(
        "upcycle-untied-head-missing-verified",
        ("upcycle", "dense", "out", "--num-experts", "4"),
        1,
        "tensor 'lm_head.weight' is missing",
        set_config("dense", tie_word_embeddings=False),
    ),
    Cli(
        "upcycle-vocab-above-embedding-rows",
        ("upcycle", "dense", "out", "--num-experts", "4", "--no-verify"),
        1,
        "config.json vocab_size = 200",
        set_config("dense", vocab_size=200),
    ),
    Cli(
        "upcycle-source-holds-nan",
        ("upcycle", "dense", "out", "--num-experts", "4", "--no-verify"),
        1,
        "model.layers.1.mlp.down_proj.weight holds NaN",
        edit_tensors("dense", set_value("model.layers.1.mlp.down_proj.weight", float("nan"))),
    ),
    # issue 19: text that is not UTF-8 on the command line is refused at the edge, naming the byte
    Cli(
        "text-run-prompt-invalid-byte",
        ("run", "moe", "--prompt", "w5 \udcff w6"),
        2,
        "argument -p/--prompt: not valid UTF-8 at byte 3 (0xff: invalid start byte)",
        with_tokenizer,
    ),
    Cli(
        "text-run-prompt-cut-character",
        ("run", "moe", "--prompt", "w5 w6 \udce2\udc82"),
        2,
        "argument -p/--prompt: not valid UTF-8 at byte 6 (0xe2 0x82: unexpected end of data)",
        with_tokenizer,
    ),
    Cli(
        "text-run-prompt-overlong-slash",
        ("run", "moe", "--prompt", "\udcc0\udcaf"),
        2,
        "argument -p/--prompt: not valid UTF-8 at byte 0 (0xc0: invalid start byte)",
        with_tokenizer,
    ),
    Cli(
        "text-run-prompt-encoded-surrogate",
        ("run", "moe", "--prompt", "w5\udced\udca0\udc80"),
        2,
        "argument -p/--prompt: not valid UTF-8 at byte 2 (0xed: invalid continuation byte)",
        with_tokenizer,
    ),
    Cli(
        "text-run-prompt-latin-1",
        ("run", "moe", "--prompt", "caf\udce9 w5", "--chat"),
        2,
        "argument -p/--prompt: not valid UTF-8 at byte 3",
        with_tokenizer,
    ),
    Cli(
        "text-chat-system-invalid-byte",
        ("chat", "moe", "--system", "w5 \udc80"),
        2,
        "argument --system: not valid UTF-8 at byte 3 (0x80: invalid start byte)",
        with_tokenizer,
    ),
    Cli(
        "text-run-prompt-file-invalid-byte",
        ("run", "moe", "-f", "prompt.txt"),
        2,
        "argument -f/--file: prompt.txt: not valid UTF-8 at byte 3 (0xff: invalid start byte)",
        lambda work: (work / "prompt.txt").write_bytes(b"w5 \xff w6"),
    ),
    # issue 20: the path is checked before the tokenizer, and the error names what it is
    Cli(
        "path-run-gguf-file",
        ("run", "model.Q4_K_M.gguf", "-p", "hi"),
        1,
        "model.Q4_K_M.gguf: a GGUF file (llama.cpp's format), not a checkpoint folder",
        a_file("model.Q4_K_M.gguf"),
    ),
    Cli("path-chat-gguf-file", ("chat", "model.gguf"), 1, "model.gguf: a GGUF file", a_file("model.gguf")),
    Cli(
        "path-serve-gguf-file",
        ("serve", "model.gguf", "--port", "58613"),
        1,
        "model.gguf: a GGUF file",
        a_file("model.gguf"),
    ),
    Cli(
        "path-run-folder-of-gguf-files",
        ("run", "ggufs", "-p", "hi"),
        1,
        "ggufs: holds GGUF files (model-Q4_K_M.gguf: llama.cpp's format) and no config.json",
        gguf_folder,
    ),
    Cli(
        "path-run-pickle-weights",
        ("run", "moe", "-p", "hi"),
        1,
        "moe: its weights are PyTorch pickle files (model-00001-of-00003.bin), which moe-patch does not read",
        moe_pickles,
    ),
    Cli("path-run-no-such-folder", ("run", "./no/such", "-p", "hi"), 1, "./no/such: no such folder"),
    Cli(
        "path-run-offline-hub-id",
        ("run", "someone/some-moe", "-p", "hi"),
        1,
        "someone/some-moe: no folder of that name here, and as a Hub repo id: Could not download 'someone/some-moe': "
        "HF_HUB_OFFLINE is set and no cached copy exists",
    ),
    # issue 20: a size without a unit is refused with the expected form; budgets name the command line's flags
    Cli(
        "size-run-expert-cache-without-unit",
        ("run", "moe", "--prompt-ids", "1", "--expert-cache", "24"),
        2,
        "argument --expert-cache: '24' has no unit; give a unit, e.g. 24GiB or 24MB (24B for bytes)",
    ),
    Cli(
        "size-inspect-gpu-without-unit",
        ("inspect", "moe", "--gpu", "80"),
        2,
        "argument --gpu: '80' has no unit; give a unit, e.g. 80GiB",
    ),
    Cli(
        "budget-run-below-one-expert-names-the-flags",
        ("run", "moe", "--prompt-ids", "1", "--expert-cache", "100B"),
        1,
        "--expert-cache=100 B (100 bytes) is smaller than one expert",
    ),
    Cli(
        "budget-run-says-quantize-as-a-flag",
        ("run", "moe", "--prompt-ids", "1", "--expert-cache", "100B"),
        1,
        "quantize the experts (--quantize nf4) to shrink them",
    ),
    Cli(
        "arg-run-prompt-file-missing",
        ("run", "moe", "-f", "nope.txt"),
        2,
        "argument -f/--file: cannot read nope.txt: No such file or directory",
    ),
    Cli(
        "arg-run-ctx-size-above-the-model",
        ("run", "moe", "--prompt-ids", "1", "-c", "100000"),
        1,
        "--ctx-size 100000: the model's context is",
    ),
]


def _env(work: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_HUB_OFFLINE="1", HF_HOME=str(work / ".cache" / "hf"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
    )
    env.update({k: str(work / v) if k == "PYTHONPATH" else v for k, v in extra.items()})
    return env


@pytest.mark.skipif(not MOE_PATCH.exists(), reason="the moe-patch console script is not installed")
@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_prints_one_line_exits_non_zero_and_loses_nothing(case, work):
    if case.prepare:
        case.prepare(work)
    before = snapshot(work)
    proc = subprocess.run(
        [str(MOE_PATCH), *case.argv], cwd=work, env=_env(work, case.env), capture_output=True, text=True, timeout=600
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == case.code, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"moe-patch {case.argv[0]}: error: ") and case.message in lines[0], lines[0]
    assert snapshot(work) == before  # inputs unchanged, no partial output, no temporary folder left


# -- the library table -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lib:
    id: str
    call: Callable[[Path, pytest.MonkeyPatch], object]
    error: type[MoEPatchError]
    message: str
    prepare: Callable[[Path], None] | None = None


def _load(work: Path, **kw):
    return moe_patch.load_model(work / "moe", **kw)


def _upcycle(work: Path, out: str = "out", **kw):
    from converters import UpcycleConfig, upcycle

    return upcycle(work / "dense", work / out, UpcycleConfig(**{"num_experts": 4, "verify": False, **kw}))


def _push_dry(work: Path, **kw):
    from hub_scripts.push import push_folder

    return push_folder(work / "moe", "me/x", dry_run=True, **kw)


def _push_nowhere(work: Path):
    """A real push to a closed port: the network fails after the local steps."""
    import socket

    from hub_scripts.api import make_api
    from hub_scripts.push import push_folder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return push_folder(work / "moe", "me/x", api=make_api(endpoint=f"http://127.0.0.1:{port}", token=TOKEN))


def _denied(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Opening any file called ``name`` fails as on a file without read permission (the tests run as root too,
    where chmod cannot deny a read)."""
    import builtins
    import io

    real = io.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(name):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # Path.read_text / read_bytes


def _read_only_fs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating anything fails as on a read-only mount (EROFS)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def _expert_shard_name(work: Path) -> str:
    return shard_of(work / "moe", ".experts.")[0].name


def _header_entry(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        shard, key = shard_of(work / "moe", ".experts.")
        rewrite_header(shard, lambda h: fn(h[key]))

    return prepare


def _header_is_a_list(work: Path) -> None:
    shard, _ = shard_of(work / "moe", ".experts.")
    new = b"[1, 2, 3]"
    shard.write_bytes(struct.pack("<Q", len(new)) + new)


def _plot(work: Path, target: str):
    import torch

    from moe_patch.testing.tiny import tiny_model

    model, inputs = tiny_model("mixtral")
    with moe_patch.monitor(model) as mon, torch.no_grad():
        model(**inputs)
    return mon.plot(work / target)


def _mkdir_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a folder fails as without write permission on its parent (root may create anywhere)."""

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)


def _inspect_folder(work: Path, folder: str = ""):
    from moe_patch.cli.inspect import inspect_folder

    return inspect_folder(work / folder)


LIB_CASES = [
    # 1. push: the one header reader, then index <-> shard agreement; a malformed header is never a bare error
    Lib(
        "push-header-entry-shape-not-a-list",
        lambda w, m: _push_dry(w),
        CheckpointError,
        "malformed header entry",
        _header_entry(lambda e: e.update(shape="big")),
    ),
    Lib(
        "push-header-negative-offset",
        lambda w, m: _push_dry(w),
        CheckpointError,
        "negative sizes or offsets",
        _header_entry(lambda e: e.update(data_offsets=[-8, e["data_offsets"][1] - e["data_offsets"][0] - 8])),
    ),
    Lib(
        "push-header-not-an-object",
        lambda w, m: _push_dry(w),
        CheckpointError,
        "not a safetensors JSON object",
        _header_is_a_list,
    ),
    Lib(
        "push-read-only-folder",
        lambda w, m: (_read_only_fs(m), _push_nowhere(w)),
        OutputError,
        "README.md: writing failed (Read-only file system)",
    ),
    Lib(
        "push-unreadable-shard",
        lambda w, m: (_denied(m, _expert_shard_name(w)), _push_dry(w)),
        CheckpointError,
        "permission denied",
    ),
    Lib(
        "push-index-names-a-tensor-the-shard-lacks",
        lambda w, m: _push_dry(w),
        CheckpointError,
        "'model.ghost.weight' is listed in model.safetensors.index.json but absent",
        add_ghost_to_index,
    ),
    Lib(
        "push-shard-holds-a-tensor-the-index-lacks",
        lambda w, m: _push_dry(w),
        CheckpointError,
        "does not list it there",
        drop_from_index,
    ),
    # 2. one config validation: the library loader and the card run the same checks as `inspect`
    Lib(
        "config-load-model-top-k-above-experts",
        lambda w, m: _load(w),
        MoEConfigError,
        "num_experts_per_tok = 8 exceeds num_local_experts = 4",
        set_config("moe", num_experts_per_tok=8),
    ),
    Lib(
        "config-load-model-top-k-string",
        lambda w, m: _load(w),
        MoEConfigError,
        "num_experts_per_tok must be an integer, got '64 2'",
        set_config("moe", num_experts_per_tok="64 2"),
    ),
    Lib("arg-load-model-unknown-device", lambda w, m: _load(w, device="tpu"), MoEConfigError, "not a device name"),
    Lib(
        "arg-load-model-unknown-dtype", lambda w, m: _load(w, dtype="float33"), InvalidArgumentError, "dtype='float33'"
    ),
    Lib(
        "config-inspect-index-not-an-object",
        lambda w, m: _inspect_folder(w, "moe"),
        CheckpointError,
        "malformed safetensors index",
        lambda w: (w / "moe" / INDEX).write_text("[]"),
    ),
    # 3. arguments
    Lib("arg-load-model-budget-not-a-size", lambda w, m: _load(w, expert_cache="lots"), BudgetError, UNITS),
    Lib(
        "arg-upcycle-shard-size-not-a-size",
        lambda w, m: _upcycle(w, max_shard_size="5XB"),
        InvalidArgumentError,
        "--max-shard-size: cannot read '5XB' as a size; write a number of bytes, or a number with a unit",
    ),
    Lib(
        "arg-upcycle-negative-router-std",
        lambda w, m: _upcycle(w, router_std=-1.0),
        MoEConfigError,
        "--router-std -1.0: expected a finite std > 0",
    ),
    Lib(
        "arg-upcycle-nan-noise",
        lambda w, m: _upcycle(w, noise=float("nan")),
        MoEConfigError,
        "--noise nan: expected a finite, non-negative relative std",
    ),
    # 4. errors that name the place
    Lib(
        "where-inspect-model-given-a-path",
        lambda w, m: moe_patch.inspect_model(str(w / "moe")),
        NotAModelError,
        "expected a model (torch.nn.Module), got str",
    ),
    Lib(
        "where-patch-model-given-a-path",
        lambda w, m: moe_patch.patch_model(w / "moe"),
        NotAModelError,
        "run `moe-patch inspect PATH`",
    ),
    Lib(
        "where-load-model-unreadable-shard",
        lambda w, m: (_denied(m, _expert_shard_name(w)), _load(w)),
        CheckpointError,
        "permission denied; make the file readable",
    ),
    Lib(
        "where-upcycle-unreadable-shard",
        lambda w, m: (_denied(m, "model.safetensors"), _upcycle(w)),
        CheckpointError,
        "dense/model.safetensors: permission denied",
    ),
    Lib(
        "where-inspect-unreadable-config",
        lambda w, m: (_denied(m, "config.json"), _inspect_folder(w, "moe")),
        CheckpointError,
        "config.json: cannot read it (Permission denied)",
    ),
    Lib(
        "where-upcycle-read-only-output",
        lambda w, m: (_read_only_fs(m), _upcycle(w)),
        OutputError,
        "out: writing failed (Read-only file system); nothing was written",
    ),
    # handled before: must stay so
    Lib("ok-load-model-missing-shard", lambda w, m: _load(w), CheckpointError, "is missing", unlink_a_shard),
    Lib("ok-load-model-truncated-shard", lambda w, m: _load(w), CheckpointError, "truncated", truncate_expert_shard),
    Lib(
        "ok-load-model-budget-below-one-expert",
        lambda w, m: _load(w, expert_cache=100),
        BudgetError,
        "smaller than one expert",
    ),
    Lib(
        "ok-load-model-unknown-argument", lambda w, m: _load(w, colour="blue"), MoEConfigError, "unsupported arguments"
    ),
    Lib(
        "ok-load-model-path-is-a-file",
        lambda w, m: moe_patch.load_model(w / "moe" / "config.json"),
        CheckpointError,
        "not a checkpoint directory",
    ),
    Lib("ok-inspect-folder-without-config", lambda w, m: _inspect_folder(w), CheckpointError, "config.json: not found"),
    Lib(
        "ok-push-missing-shard",
        lambda w, m: _push_dry(w),
        CheckpointError,
        "listed in model.safetensors.index.json is missing",
        unlink_a_shard,
    ),
    Lib(
        "ok-push-pull-request-to-a-branch",
        lambda w, m: _push_dry(w, create_pr=True, branch="dev"),
        HubError,
        "cannot be combined with --branch dev",
    ),
    Lib(
        "ok-upcycle-output-exists", lambda w, m: _upcycle(w, out="moe"), OutputError, "already exists; pass --overwrite"
    ),
    Lib("ok-upcycle-top-k-zero", lambda w, m: _upcycle(w, top_k=0), MoEConfigError, "must be >= 1"),
    Lib("ok-upcycle-pickle-only", lambda w, m: _upcycle(w), CheckpointError, "reads only safetensors", pickle_only),
    Lib(
        "ok-upcycle-more-experts-per-token-than-experts",
        lambda w, m: _upcycle(w, num_experts=2, top_k=4),
        MoEConfigError,
        "top-k",
    ),
    # issue 19: the source must hold every tensor its config implies, in the shape it implies, with finite values
    Lib(
        "upcycle-untied-head-missing",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "tensor 'lm_head.weight' is missing",
        set_config("dense", tie_word_embeddings=False),
    ),
    Lib(
        "upcycle-untied-head-missing-verified",
        lambda w, m: _upcycle(w, verify=True),
        CheckpointError,
        "tie_word_embeddings=false",
        set_config("dense", tie_word_embeddings=False),
    ),
    Lib(
        "upcycle-vocab-above-embedding-rows",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "config.json vocab_size = 200 but model.embed_tokens.weight has 128 rows",
        set_config("dense", vocab_size=200),
    ),
    Lib(
        "upcycle-vocab-below-embedding-rows",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "config.json vocab_size = 100 but model.embed_tokens.weight has 128 rows",
        set_config("dense", vocab_size=100),
    ),
    Lib(
        "upcycle-final-norm-missing",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "tensor 'model.norm.weight' is missing",
        drop_tensor("dense", "model.norm.weight"),
    ),
    Lib(
        "upcycle-attention-weight-missing",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "tensor 'model.layers.1.self_attn.o_proj.weight' is missing",
        drop_tensor("dense", "model.layers.1.self_attn.o_proj.weight"),
    ),
    Lib(
        "upcycle-kv-heads-disagree-with-weights",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "model.layers.0.self_attn.k_proj.weight has shape [16, 32], config.json implies [8, 32]",
        set_config("dense", num_key_value_heads=1),
    ),
    Lib(
        "upcycle-source-expert-weight-holds-nan",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "model.layers.0.mlp.up_proj.weight holds NaN",
        edit_tensors("dense", set_value("model.layers.0.mlp.up_proj.weight", float("nan"))),
    ),
    Lib(
        "upcycle-source-embedding-holds-inf",
        lambda w, m: _upcycle(w),
        CheckpointError,
        "model.embed_tokens.weight holds NaN or infinite values",
        edit_tensors("dense", set_value("model.embed_tokens.weight", float("-inf"), (5, 3))),
    ),
    Lib(
        "upcycle-verify-names-overflow-in-the-source",
        lambda w, m: _upcycle(w, verify=True),
        VerificationError,
        "the dense model's own logits are not finite",
        edit_tensors("dense", fill("model.norm.weight", 3.0e38)),
    ),
    # issue 19: UpcycleConfig fields of the wrong type are typed errors, never truncated or a bare ValueError
    Lib(
        "upcycle-arg-top-k-word",
        lambda w, m: _upcycle(w, top_k="two"),
        MoEConfigError,
        "--top-k 'two': expected an integer",
    ),
    Lib(
        "upcycle-arg-top-k-fraction",
        lambda w, m: _upcycle(w, top_k=2.5),
        MoEConfigError,
        "--top-k 2.5: expected an integer",
    ),
    Lib(
        "upcycle-arg-top-k-bool",
        lambda w, m: _upcycle(w, top_k=True),
        MoEConfigError,
        "--top-k True: expected an integer",
    ),
    Lib(
        "upcycle-arg-num-experts-text",
        lambda w, m: _upcycle(w, num_experts="4"),
        MoEConfigError,
        "--num-experts '4': expected an integer",
    ),
    Lib(
        "upcycle-arg-num-experts-fraction",
        lambda w, m: _upcycle(w, num_experts=4.5),
        MoEConfigError,
        "--num-experts 4.5: expected an integer",
    ),
    Lib(
        "upcycle-arg-granularity-fraction",
        lambda w, m: _upcycle(w, granularity=1.5),
        MoEConfigError,
        "--granularity 1.5: expected an integer",
    ),
    Lib("upcycle-arg-seed-text", lambda w, m: _upcycle(w, seed="7"), MoEConfigError, "--seed '7': expected an integer"),
    Lib(
        "upcycle-arg-moe-layers-fractions",
        lambda w, m: _upcycle(w, moe_layers=[0.5, 1]),
        MoEConfigError,
        "--moe-layers [0.5, 1]: expected layer indices",
    ),
    Lib(
        "upcycle-arg-experts-from-one-string",
        lambda w, m: _upcycle(w, num_experts=None, experts_from="dense"),
        MoEConfigError,
        "--experts-from 'dense': expected a list of model folders",
    ),
    Lib(
        "upcycle-arg-noise-text",
        lambda w, m: _upcycle(w, noise="0.1"),
        MoEConfigError,
        "--noise '0.1': expected a number",
    ),
    Lib(
        "upcycle-arg-drop-ratio-text",
        lambda w, m: _upcycle(w, drop_ratio="half"),
        MoEConfigError,
        "--drop-ratio 'half': expected a number",
    ),
    Lib(
        "upcycle-arg-router-std-text",
        lambda w, m: _upcycle(w, router_std="big"),
        MoEConfigError,
        "--router-std 'big': expected a number",
    ),
    Lib(
        "upcycle-arg-verify-text",
        lambda w, m: _upcycle(w, verify="no"),
        MoEConfigError,
        "verify 'no': expected True or False",
    ),
    Lib(
        "upcycle-arg-dtype-torch",
        lambda w, m: _upcycle(w, dtype=__import__("torch").float16),
        MoEConfigError,
        "--dtype torch.float16: expected one of auto, float32",
    ),
    # issue 19: a plot to a path that cannot be written is one OutputError, whatever the reason
    Lib(
        "plot-parent-is-a-file",
        lambda w, m: _plot(w, "notes.txt/routing.png"),
        OutputError,
        "notes.txt: cannot create the folder",
        a_file("notes.txt"),
    ),
    Lib(
        "plot-grandparent-is-a-file",
        lambda w, m: _plot(w, "notes.txt/sub/routing.png"),
        OutputError,
        "notes.txt/sub: cannot create the folder",
        a_file("notes.txt"),
    ),
    Lib("plot-nul-in-the-name", lambda w, m: _plot(w, "rout\x00ing.png"), OutputError, "NUL"),
    Lib(
        "plot-folder-not-permitted",
        lambda w, m: (_mkdir_denied(m), _plot(w, "sub/routing.png")),
        OutputError,
        "sub: cannot create the folder (Permission denied)",
    ),
    Lib("ok-plot-onto-a-folder", lambda w, m: _plot(w, "moe"), OutputError, "moe: writing failed"),
    Lib(
        "ok-plot-read-only-folder",
        lambda w, m: (_read_only_fs(m), _plot(w, "routing.png")),
        OutputError,
        "routing.png: writing failed (Read-only file system)",
    ),
]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_shard_without_read_permission_is_named_as_such_not_as_truncated(work):
    """The same as the where-*-unreadable-shard rows, with a real chmod (the rows simulate it for root)."""
    from hub_scripts.push import push_folder

    shard, _ = shard_of(work / "moe", ".experts.")
    shard.chmod(0)
    try:
        for call in (
            lambda: push_folder(work / "moe", "me/x", dry_run=True),
            lambda: moe_patch.load_model(work / "moe"),
        ):
            with pytest.raises(CheckpointError, match="permission denied"):
                call()
    finally:
        shard.chmod(0o644)


@pytest.mark.parametrize("case", LIB_CASES, ids=lambda c: c.id)
def test_library_raises_a_moe_patch_error_naming_the_place_and_loses_nothing(case, work, monkeypatch):
    if case.prepare:
        case.prepare(work)
    before = snapshot(work)
    try:
        case.call(work, monkeypatch)
    except Exception as exc:  # never a bare KeyError / IndexError / struct.error / OSError
        error = exc
    else:
        raise AssertionError("no error was raised")
    finally:
        monkeypatch.undo()  # give `open` and tempfile back before looking at the folder
    assert isinstance(error, case.error) and isinstance(error, MoEPatchError), repr(error)
    assert case.message in str(error), str(error)
    assert snapshot(work) == before


def test_offload_routing_error_names_the_layer_path(work):
    """The resident path names the layer (`model.layers.0.mlp.experts: non-finite routing weights`); so must
    the offloaded one (fixed by the lead in offload/attach.py)."""
    import torch

    model = moe_patch.load_model(work / "moe")
    router = model.get_submodule("model.layers.0.mlp.gate")
    real = router.forward

    def nan_weights(x):
        logits, w, idx = real(x)
        return logits, torch.full_like(w, float("nan")), idx

    router.forward = nan_weights
    with pytest.raises(RoutingError, match=r"model\.layers\.0\.mlp\.experts: non-finite"):
        model(torch.tensor([[1, 2, 3]]))


# -- 1. push leaves the user's folder as it was -----------------------------------------------------------------
def test_a_failed_upload_leaves_no_generated_card_in_the_folder(hub, api, ckpt):
    from hub_scripts.errors import UploadInterruptedError
    from hub_scripts.push import push_folder

    before = snapshot(ckpt)
    hub.fail_lfs_puts = 1
    with pytest.raises(UploadInterruptedError):
        push_folder(ckpt, "tester/cut", api=api)
    assert snapshot(ckpt) == before  # no README.md left behind


def test_a_failed_upload_puts_back_the_readme_it_replaced(hub, api, ckpt):
    from hub_scripts.errors import UploadInterruptedError
    from hub_scripts.push import push_folder

    (ckpt / "README.md").write_bytes(b"# my own card\n\xff not even utf-8\n")
    before = snapshot(ckpt)
    hub.fail_lfs_puts = 1
    with pytest.raises(UploadInterruptedError):
        push_folder(ckpt, "tester/cut", overwrite_card=True, api=api)
    assert snapshot(ckpt) == before


def test_a_valid_checkpoint_still_pushes_with_its_card(hub, api, ckpt):
    from hub_scripts.push import push_folder

    push_folder(ckpt, "tester/fine", api=api)
    assert set(hub.files_at("tester/fine")) >= {"README.md", INDEX, "config.json"}


# -- 5. leftovers of a conversion killed with SIGKILL -------------------------------------------------------------
KILL_MID_CONVERSION = """
import os, signal, sys
import converters.writer as writer
from converters import UpcycleConfig, upcycle

real = writer.ShardWriter.write
def write_then_die(self, name, tensor):
    real(self, name, tensor)
    if self._pos == 10:
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
writer.ShardWriter.write = write_then_die
upcycle(sys.argv[1], sys.argv[2], UpcycleConfig(num_experts=4, verify=False))
"""


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_killed_conversion_leftover_is_removed_by_the_next_run_which_says_so(work, caplog):
    from converters import UpcycleConfig, upcycle

    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_CONVERSION, str(work / "dense"), str(work / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no handler ran
    leftovers = _hidden(work)
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.tmp-") and not (work / "out").exists()
    size = sum(p.stat().st_size for p in (work / leftovers[0]).rglob("*") if p.is_file())
    assert size > 0

    with caplog.at_level(logging.WARNING, logger="moe_patch.atomic"):
        upcycle(work / "dense", work / "out", UpcycleConfig(num_experts=4, verify=False))
    assert _hidden(work) == [] and (work / "out" / "config.json").is_file()
    from moe_patch.sizes import format_bytes

    assert f"removed {work / leftovers[0]} ({format_bytes(size)}), left by a run that was killed" in caplog.text


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_replacement_gets_the_previous_output_back(work, caplog):
    """Killed between moving the old OUT aside and renaming the new one in: the next run restores OUT."""
    from moe_patch.atomic import _host, clean_leftovers

    old = work / f".out.old-{_host()}-{_dead_pid()}-abc123"
    (old / "out").mkdir(parents=True)
    (old / "out" / "weights.safetensors").write_bytes(b"precious")
    new = work / f".out.tmp-{_host()}-{_dead_pid()}-def456"
    new.mkdir()
    with caplog.at_level(logging.WARNING, logger="moe_patch.atomic"):
        clean_leftovers(work / "out")
    assert (work / "out" / "weights.safetensors").read_bytes() == b"precious"
    assert _hidden(work) == [] and "restored the previous version" in caplog.text


@pytest.mark.parametrize("owner", ["a live process", "another host", "an older moe-patch"])
def test_leftovers_that_may_not_be_dead_are_kept_and_reported_with_size_and_place(work, caplog, owner):
    from moe_patch.atomic import _host, clean_leftovers

    name = {
        "a live process": f".out.tmp-{_host()}-{os.getpid()}-abc123",
        "another host": f".out.tmp-othermachine-{_dead_pid()}-abc123",
        "an older moe-patch": ".out.tmp-abc123",
    }[owner]
    (work / name).mkdir()
    (work / name / "model.safetensors").write_bytes(b"x" * 3000)
    with caplog.at_level(logging.WARNING, logger="moe_patch.atomic"):
        assert clean_leftovers(work / "out") == []
    assert (work / name / "model.safetensors").exists()
    assert f"{work / name} (2.93 KiB) is a temporary copy of out" in caplog.text and "delete it" in caplog.text


# -- 6. one size parser, one byte formatter -----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["5GB", "500MB", "100KB", "2GiB", "512MiB", "40KiB", "7gib", "3mb"])
def test_size_parser_agrees_with_transformers_on_what_transformers_reads(text):
    """Same bytes as transformers' max_shard_size for its spellings (upper-case B: a lower-case one means bits
    there, while every size here is in bytes)."""
    from transformers.utils.hub import convert_file_size_to_int

    from moe_patch.sizes import parse_size

    assert parse_size(text) == convert_file_size_to_int(text.upper())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.5GiB", 3 * 2**29),
        (" 8 gib ", 8 * 2**30),
        ("2TB", 2 * 10**12),
        ("4096", 4096),
        ("1.5G", 3 * 2**29),
        (".5KiB", 512),
        (0, 0),
    ],
)
def test_size_parser_reads_what_transformers_does_not(text, expected):
    from moe_patch.sizes import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["60KB", "50KiB", "40K", "0.05MB"])
def test_the_same_size_means_the_same_bytes_for_shards_and_budgets(dense_dir, text):
    """`--max-shard-size X` shards exactly as many bytes as `--expert-cache X` budgets (they were two parsers)."""
    from converters import UpcycleConfig, plan_upcycle
    from moe_patch.offload.budget import parse_bytes

    def shards(max_shard_size):
        plan = plan_upcycle(dense_dir, UpcycleConfig(num_experts=4, max_shard_size=max_shard_size))
        plan.weights.close()
        return [[s.name for s in shard] for shard in plan.shards]

    assert len(shards(text)) > 1 and shards(text) == shards(parse_bytes(text, name="expert_cache"))


def test_one_byte_formatter_for_the_whole_package():
    from hub_scripts import push
    from moe_patch.detect import table
    from moe_patch.offload import budget
    from moe_patch.sizes import format_bytes

    assert table.human_bytes is push.human_bytes is budget.format_bytes is format_bytes
    assert [format_bytes(n) for n in (0, 1023, 1536, 3 * 2**30, 5 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.50 KiB",
        "3.00 GiB",
        "5.00 TiB",
    ]


# -- the CLI's last line of defence --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raised, line",
    [
        (
            OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"),
            "moe-patch boom: error: /mnt/ro/out: Read-only file system",
        ),
        (
            KeyError("weight"),
            "moe-patch boom: internal error: KeyError: 'weight' (re-run with --debug for the traceback",
        ),
    ],
)
def test_an_error_nobody_foresaw_is_still_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, raised, line):
    from moe_patch.cli import entry as cli

    def register(sub):
        sub.add_parser("boom").set_defaults(func=lambda args: (_ for _ in ()).throw(raised))

    monkeypatch.setattr(cli, "_registrars", lambda: [register])
    assert cli.main(["boom"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err
    with pytest.raises(type(raised)):
        cli.main(["--debug", "boom"])


# -- issue 19: untrusted text in `moe-patch chat` ------------------------------------------------------------------
def test_chat_refuses_a_line_that_is_not_utf8_names_the_byte_and_keeps_the_session(work):
    """Bytes that are not UTF-8 on chat's stdin: that line is refused in one line naming the byte, nothing is sent
    to the model, and the next line is answered as usual."""
    with_tokenizer(work)
    lines = b"w5 \xff w6\nw7 \xe2\x82\nw8 w9\n!exit\n"
    proc = subprocess.run(
        [str(MOE_PATCH), "chat", "moe", "--temperature", "0", "--max-new-tokens", "3"],
        cwd=work,
        env=_env(work, {}),
        input=lines,
        capture_output=True,
        timeout=600,
    )
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "not valid UTF-8 at byte 3 (0xff: invalid start byte); nothing was sent" in out, out
    assert "not valid UTF-8 at byte 3 (0xe2 0x82: unexpected end of data); nothing was sent" in out, out
    assert out.count(" decode tokens at ") == 1  # one reply: to `w8 w9`
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize(
    "line, message",
    [
        ("w5 \ud800 w6", "not valid text: a lone surrogate U+D800 at character 3"),
        ("\udfff", "not valid text: a lone surrogate U+DFFF at character 0"),
        ("w5 " + "w6 " * 700_000, "(2100002 bytes); the model's context of 64 tokens"),
    ],
)
def test_chat_refuses_text_it_cannot_tokenize_and_the_session_goes_on(work, line, message):
    """The same for text that is not Unicode at all (a lone surrogate, which only an API caller can produce) and for a
    line far longer than the context could hold (refused before it is tokenized)."""
    import argparse

    from moe_patch.serve.chat import ChatSession
    from moe_patch.serve.tokenizer import load_tokenizer

    with_tokenizer(work)
    model = moe_patch.load_model(work / "moe")
    args = argparse.Namespace(
        path="moe",
        system=None,
        max_new_tokens=2,
        verbose_prompt=False,
        temperature=0.0,
        top_p=None,
        top_k=None,
        repetition_penalty=None,
        seed=None,
    )
    import io

    out = io.StringIO()
    session = ChatSession(model, load_tokenizer(work / "moe", instead=""), args, out=out)
    typed = iter([line, "w8 w9", "!exit"])
    session.loop(read=lambda prompt: next(typed))
    assert message in out.getvalue(), out.getvalue()
    assert out.getvalue().count(" decode tokens at ") == 1 and session.messages[0]["content"] == "w8 w9"


# -- issue 19: the server's untrusted input -------------------------------------------------------------------------
SERVE_KEY = "sk-bad-inputs-7d1e"
SERVE_CONTEXT = 256


@dataclass
class Served:
    url: str
    log: Path
    pid: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def peak_rss(self) -> int:
        """The server's peak resident memory in bytes (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


def _http(
    url: str,
    path: str,
    body: bytes | dict | None = None,
    *,
    key: str | None = SERVE_KEY,
    method: str | None = None,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    """One request over a fresh connection: (status, JSON answer, or {"raw": text} for a stream)."""
    import http.client
    from urllib.parse import urlsplit

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    host = urlsplit(url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        conn.request(method or ("POST" if data is not None else "GET"), path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read().decode(errors="replace")
        try:
            return resp.status, json.loads(raw)
        except json.JSONDecodeError:
            return resp.status, {"raw": raw}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`moe-patch serve` on a tiny Mixtral with a word-level tokenizer and a chat template, as a user starts it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import signal
    import socket
    import time

    from tests.helpers.offload import VOCAB, build
    from tests.helpers.tokenizer import save_word_tokenizer

    model = build("mixtral")
    model.config.max_position_embeddings = SERVE_CONTEXT
    path = tmp_path_factory.mktemp("served") / "tiny-chat-moe"
    model.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = path.parent / "server.log"
    env = {**os.environ, "MOE_PATCH_API_KEY": SERVE_KEY, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(MOE_PATCH), "serve", str(path), "--port", str(port), "--dtype", "float32"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    served = Served(f"http://127.0.0.1:{port}", log, proc.pid)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, served.log_text()
        try:
            if _http(served.url, "/health", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, served.log_text()
        time.sleep(0.25)
    yield served
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


HI = [{"role": "user", "content": "w5 w6 w7"}]


def _text_of(status: int, answer: dict, stream: bool) -> str:
    assert status == 200, answer
    if not stream:
        choice = answer["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    pieces = []
    for line in answer["raw"].splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event.get("choices", []):
                pieces.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(pieces)


@pytest.mark.parametrize("count, length", [(1, 1), (1, 64), (2, 7), (3, 33), (4, 1), (4, 64)])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_stop_strings_of_any_count_and_length_are_answered(served, count, length, stream, route):
    """`stop` with 1-4 strings of 1-64 characters: 200, never `ValueError: substring not found`."""
    stops = [
        ("w1" + "xyz" * 30)[: length - 1] + chr(ord("a") + i) if length > 1 else chr(ord("a") + i) for i in range(count)
    ]
    body = {
        "max_tokens": 6,
        "temperature": 0,
        "stream": stream,
        "stop": stops if count > 1 else stops[0],
        **({"messages": HI} if "chat" in route else {"prompt": "w5 w6 w7"}),
    }
    _text_of(*_http(served.url, route, body), stream)
    assert "substring not found" not in served.log_text()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_the_model_writes_ends_the_answer_there(served, stream):
    body = {"messages": HI, "max_tokens": 12, "temperature": 0, "stream": stream}
    full = _text_of(*_http(served.url, "/v1/chat/completions", body), stream)
    words = full.split()
    assert len(words) >= 4, full
    stop = f"{words[1]} {words[2]}"
    cut = _text_of(*_http(served.url, "/v1/chat/completions", {**body, "stop": [stop, "zz"]}), stream)
    assert cut == full[: full.index(stop)]  # left out, as OpenAI's API does


@pytest.mark.parametrize(
    "stop, why",
    [
        (["a", "b", "c", "d", "e"], "at most 4"),
        ([""], "empty"),
        ("", "empty"),
        ([7], "valid string"),
    ],
)
def test_stop_values_openai_refuses_are_refused(served, stop, why):
    status, answer = _http(served.url, "/v1/chat/completions", {"messages": HI, "max_tokens": 3, "stop": stop})
    assert status == 400 and answer["error"]["param"].startswith("stop") and why in answer["error"]["message"], answer


NOT_TEXT = {  # valid JSON whose strings are not Unicode text (lone surrogates): the raw request bodies
    "lone-high-surrogate-in-a-message": (
        b'{"messages": [{"role": "user", "content": "w5 \\ud800 w6"}]}',
        "messages.0.content",
        "U+D800 at character 3",
    ),
    "lone-low-surrogate-in-the-system-prompt": (
        b'{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", "content": "w5"}]}',
        "messages.0.content",
        "U+DFFF at character 0",
    ),
    "reversed-pair": (
        b'{"messages": [{"role": "user", "content": "\\udc00\\ud800"}]}',
        "messages.0.content",
        "U+DC00 at character 0",
    ),
    "surrogate-in-a-text-part": (
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "w5\\ud83d"}]}]}',
        "messages.0.content.0.text",
        "U+D83D at character 2",
    ),
    "surrogate-in-an-assistant-turn": (
        b'{"messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "\\udbff"}, '
        b'{"role": "user", "content": "w6"}]}',
        "messages.1.content",
        "U+DBFF",
    ),
    "surrogate-in-a-stop-string": (
        b'{"messages": [{"role": "user", "content": "w5"}], "stop": ["\\ud800"]}',
        "stop.0",
        "U+D800",
    ),
    "surrogate-in-the-user-field": (
        b'{"messages": [{"role": "user", "content": "w5"}], "user": "\\ud800"}',
        "user",
        "U+D800",
    ),
    "surrogate-in-a-metadata-key": (
        b'{"messages": [{"role": "user", "content": "w5"}], "metadata": {"\\ud800": "x"}}',
        "metadata",
        "U+D800",
    ),
}


@pytest.mark.parametrize("name", NOT_TEXT)
def test_strings_that_are_not_text_are_a_400_naming_the_field(served, name):
    body, param, where = NOT_TEXT[name]
    route = "/v1/chat/completions"
    status, answer = _http(served.url, route, body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and where in answer["error"]["message"], answer
    assert "Traceback" not in served.log_text()


def test_a_completion_prompt_that_is_not_text_is_a_400(served):
    status, answer = _http(served.url, "/v1/completions", b'{"prompt": "w5 \\udcff", "max_tokens": 3}')
    assert status == 400 and answer["error"]["param"] == "prompt", answer
    status, answer = _http(served.url, "/v1/completions", b'{"prompt": "w5 \xff\xfe", "max_tokens": 3}')
    assert status == 400, answer  # bytes that are not UTF-8: the body is not JSON text


@pytest.mark.parametrize(
    "text",
    ["w5 \u0000 w6", "w5 \uffff", "w5 \ud83d\ude00", "e\u0301\u200f w5", "\ufeffw5\r\n\tw6", "w5 " + "\u0661" * 40],
)
def test_unusual_but_valid_text_is_answered(served, text):
    status, answer = _http(
        served.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 2}
    )
    assert status == 200, answer


def test_a_50mb_prompt_is_refused_before_it_is_read_in_full(served):
    """A body far above what the context can hold is refused from its Content-Length, in well under a second
    and without the server's memory growing (before: 97 s and 3.3 GB to tokenize it, then a 400)."""
    import time

    prompt = "w5 " * (50 * 2**20 // 3)
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 3}).encode()
    peak = served.peak_rss()
    start = time.monotonic()
    status, answer = _http(served.url, "/v1/chat/completions", body, timeout=10)
    elapsed = time.monotonic() - start
    assert status == 413 and answer["error"]["code"] == "request_too_large", answer
    assert "context of 256 tokens" in answer["error"]["message"] and "--max-request-bytes" in answer["error"]["message"]
    assert elapsed < 2.0, elapsed
    assert served.peak_rss() - peak < 64 * 2**20
    assert _http(served.url, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})[0] == 200


def test_a_chunked_body_is_cut_off_at_the_limit(served):
    """Without a Content-Length the body is counted as it arrives: reading stops at the limit."""
    import http.client
    import time
    from urllib.parse import urlsplit

    host = urlsplit(served.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    chunk = b'{"messages": [{"role": "user", "content": "' + b"w5 " * 300_000
    peak, start = served.peak_rss(), time.monotonic()
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in (
        ("Content-Type", "application/json"),
        ("Authorization", f"Bearer {SERVE_KEY}"),
        ("Transfer-Encoding", "chunked"),
    ):
        conn.putheader(name, value)
    conn.endheaders()
    try:
        for _ in range(60):  # ~54 MB
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 413 and answer["error"]["code"] == "request_too_large", answer
    assert time.monotonic() - start < 2.0 and served.peak_rss() - peak < 64 * 2**20


@pytest.mark.parametrize(
    "method, query",
    [
        ("GET", "/v1/models?api_key=sk-QUERY-1111"),
        ("GET", "/health?x=1&token=sk-QUERY-2222&y=2"),
        ("POST", "/v1/chat/completions?API-KEY=sk-QUERY-3333"),
        ("GET", "/v1/models?access_token=sk%2DQUERY%2D4444"),
        ("GET", "/stats?key=sk-QUERY-5555"),
        ("GET", "/v1/models?apikey=sk-QUERY-6666&api_key=sk-QUERY-7777"),
        ("GET", f"/v1/models?api_key={SERVE_KEY}"),
    ],
)
def test_a_key_in_the_query_string_never_reaches_the_log(served, method, query):
    import time

    status, _ = _http(
        served.url, query, {"messages": HI, "max_tokens": 2} if method == "POST" else None, key=None, method=method
    )
    assert status == 401  # the key is read from the Authorization header only
    time.sleep(0.2)  # uvicorn writes its access line after answering
    log = served.log_text()
    assert query.split("?")[0] in log  # the request was logged ...
    for secret in ("sk-QUERY", "sk%2DQUERY", SERVE_KEY):
        assert secret not in log  # ... without the key


# --------------------------------------------------------------------------- quantized checkpoints (issue 19)
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOE_PATCH), *args], capture_output=True, text=True, timeout=300)


def _quantized(tmp_path, name: str) -> Path:
    """A tiny packed checkpoint of tests/helpers/formats.py's case ``name`` (bf16 twin beside it)."""
    from tests.helpers.formats import save_case

    return save_case(name, tmp_path)


def _edit_shards(path: Path, edit) -> None:
    """Rewrite every shard of ``path`` with ``edit(key, tensor) -> tensor`` (safetensors, in place)."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({k: edit(k, t) for k, t in tensors.items()}, shard, metadata={"format": "pt"})


def _set_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in fields.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


_DROP = object()


def _poison_one(value, key_part: str, expert: int | None = None):
    """An edit that writes ``value`` into the first element of every tensor whose key contains ``key_part`` (and,
    for stacked tensors, into expert ``expert``'s row only)."""

    def edit(key, t):
        if key_part not in key:
            return t
        t = t.clone()
        flat = (t[expert] if expert is not None else t).view(-1)
        if t.dtype == torch.uint8:
            flat[0] = value
        else:
            flat[0] = float(value)
        return t

    return edit


@pytest.mark.parametrize(
    "case,key_part,value,expert",
    [
        ("deepseek_v3-fp8", "experts.3.up_proj.weight_scale_inv", float("inf"), None),
        ("deepseek_v3-fp8", "experts.5.down_proj.weight_scale_inv", float("nan"), None),
        ("minimax_m2-fp8-ue8m0", "experts.2.w1.weight_scale_inv", 0xFF, None),  # e8m0's NaN code
        ("gpt_oss-mxfp4", "layers.1.mlp.experts.gate_up_proj_scales", 0xFF, 6),  # e8m0 NaN in one expert's row
        ("qwen3_moe-int4", "experts.1.gate_proj.weight_scale", float("nan"), None),
        ("qwen3_moe-metal", "experts.4.down_proj.qbiases", float("-inf"), None),
    ],
)
def test_a_non_finite_stored_scale_is_refused_naming_file_tensor_and_expert(tmp_path, case, key_part, value, expert):
    """Was: tokens silently changed or all zeros, exit 0. Checked on every read from disk (scales are a small
    fraction of an expert's bytes); the generation never completes on a corrupt expert."""
    path = _quantized(tmp_path, case)
    _edit_shards(path, _poison_one(value, key_part, expert))
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=None)  # every expert read once
    ids = torch.arange(2, 34).reshape(4, 8) % 100 + 2
    with pytest.raises(
        CheckpointError,
        match=r"\.safetensors: tensor '[^']*" + re.escape(key_part.rsplit(".", 1)[-1]) + r".*non-finite",
    ) as raised:
        with torch.no_grad():
            for _ in range(8):  # enough steps that the router picks the poisoned expert on some token
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    if expert is not None:  # a row of a tensor that stacks every expert: the message says which
        assert f"(expert {expert})" in str(raised.value)


@pytest.mark.parametrize("qc", [_DROP, {}])
def test_a_quantized_checkpoint_without_its_quantization_config_is_refused(tmp_path, qc):
    """Was: FP8 bytes read as values, scales ignored, garbage tokens with exit 0."""
    path = _quantized(tmp_path, "deepseek_v3-fp8")
    _set_config(path, quantization_config=qc)
    with pytest.raises(
        MoEConfigError,
        match=r"tensor '.*' \(float8_e4m3fn\) is fp8-quantized but .*config\.json has no "
        r"quantization_config",
    ):
        moe_patch.load_model(path)
    r = _cli("run", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert r.returncode == 1 and "no quantization_config" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["gpt_oss-mxfp4", "qwen3_moe-int4", "qwen3_moe-metal"])
def test_other_quantized_layouts_without_their_config_are_refused_too(tmp_path, case):
    path = _quantized(tmp_path, case)
    _set_config(path, quantization_config=_DROP)
    with pytest.raises(MoEConfigError, match="-quantized but .* has no quantization_config"):
        moe_patch.load_model(path)


@pytest.mark.parametrize("qc", ["fp8", ["fp8"], 3, True])
def test_a_quantization_config_that_is_not_an_object_is_one_line(tmp_path, qc):
    """Was: internal error: AttributeError ('str' object has no attribute 'to_dict')."""
    path = _quantized(tmp_path, "deepseek_v3-fp8")
    _set_config(path, quantization_config=qc)
    with pytest.raises(MoEConfigError, match="quantization_config must be a JSON object"):
        moe_patch.load_model(path)
    r = _cli("inspect", str(path))
    assert r.returncode == 1 and "quantization_config must be a JSON object" in r.stderr


def test_an_expert_whose_weights_hold_nan_is_named_with_its_layer(tmp_path):
    """bf16 experts carry no scales to check on read; the engine checks each layer's output (riding on the next
    layer's one host transfer) and names the expert that turned finite inputs into NaN."""
    from tests.helpers.offload import save_tiny

    path = save_tiny("qwen3_moe", tmp_path / "nan")
    _edit_shards(
        path,
        lambda k, t: (
            torch.full_like(t, float("nan")) if "layers.1.mlp.experts." in k and k.endswith("down_proj.weight") else t
        ),
    )
    model = moe_patch.load_model(path, dtype=torch.float32)
    with pytest.raises(
        ExpertOutputError,
        match=r"model\.layers\.1\.mlp\.experts: expert \d+ turns finite inputs into "
        r"NaN",
    ):
        with torch.no_grad():
            model(torch.tensor([[3, 4, 5, 6]]))
