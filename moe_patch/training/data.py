"""Local text for continued training: files -> a byte-level BPE -> fixed-length blocks of token ids.

Nothing is downloaded. :func:`python_stdlib_files` is a corpus every machine with Python has (the
standard library's own sources), used by ``examples/train_upcycled.py`` and ``bench/upcycle_training.py``
when no data is given.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..errors import MoEConfigError

EOS = "<|endoftext|>"


def python_stdlib_files(*, include_tests: bool = False, limit: int | None = None) -> list[Path]:
    """The ``.py`` files of this interpreter's standard library, sorted (site-packages left out, and the
    test suites unless ``include_tests``); the first ``limit`` of them when given."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and any(p in ("test", "tests", "idle_test") for p in parts):
            continue
        files.append(path)
    if not files:
        raise MoEConfigError(f"no Python source files under {root}")
    return files[:limit] if limit else files


def text_files(
    paths: Iterable[str | Path], suffixes: Sequence[str] = (".txt", ".md", ".py", ".json", ".jsonl")
) -> list[Path]:
    """Files given directly, plus the files with one of ``suffixes`` under each folder given, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        elif p.is_file():
            out.append(p)
        else:
            raise MoEConfigError(f"{p}: no such file or folder")
    if not out:
        raise MoEConfigError(f"no text files ({', '.join(suffixes)}) in {', '.join(map(str, paths))}")
    return out


def split_held_out(files: Sequence[Path], share: float = 0.05) -> tuple[list[Path], list[Path]]:
    """(train, held-out): a file is held out when the CRC32 of its name falls in the first ``share`` of
    the range, so the split is the same on every machine and does not move when files are added."""
    if not 0 < share < 1:
        raise MoEConfigError(f"held-out share must be between 0 and 1, got {share!r}")
    held = [f for f in files if zlib.crc32(f.name.encode()) < share * 2**32]
    train = [f for f in files if f not in set(held)]
    if not held or not train:
        raise MoEConfigError(f"{len(files)} files cannot be split into train and held-out at share {share}")
    return train, held


def train_byte_bpe(files: Sequence[Path], vocab_size: int = 4096):
    """A byte-level BPE (GPT-2 style) trained on ``files`` with ``tokenizers``, as a transformers
    ``PreTrainedTokenizerFast`` (``save_pretrained`` it next to a model). ``<|endoftext|>`` is its
    BOS/EOS/pad token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(
        [str(f) for f in files], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of token ids for causal-LM training (``labels`` = ``input_ids``; the model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or not len(blocks):
            raise MoEConfigError("TokenBlocks needs a non-empty [blocks, block_size] tensor of token ids")
        self.blocks = blocks

    @classmethod
    def from_files(
        cls, files: Sequence[Path], tokenizer, block_size: int, *, max_tokens: int | None = None
    ) -> TokenBlocks:
        """Each file tokenised and followed by EOS, all concatenated (in order), cut into ``block_size``
        blocks; the tail shorter than a block is dropped. Stops reading after ``max_tokens``."""
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for f in files:
            ids += tokenizer(Path(f).read_text(encoding="utf-8", errors="replace"))["input_ids"]
            if eos is not None:
                ids.append(eos)
            if max_tokens and len(ids) >= max_tokens:
                ids = ids[:max_tokens]
                break
        n = len(ids) // block_size
        if n == 0:
            raise MoEConfigError(f"{len(ids)} tokens in {len(files)} files: fewer than one block of {block_size}")
        return cls(torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}

    @property
    def tokens(self) -> int:
        return self.blocks.numel()
