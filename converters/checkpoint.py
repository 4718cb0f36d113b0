"""Reading a dense Hugging Face checkpoint lazily: config, safetensors headers, tensor slices.

Only safetensors are read (never pickle), through the package's one reader (:mod:`moe_patch.io`).
Headers and the index are checked up front, so a missing or truncated shard is reported before
anything is written; tensors are read one slice at a time as exact byte ranges, so memory stays at
the size of the slice being converted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from moe_patch.errors import CheckpointError
from moe_patch.io import DTYPES, INDEX_NAME, Checkpoint, TensorEntry, read_header, read_index, read_shards

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

#: safetensors dtype names <-> torch dtypes: the subset dense checkpoints use, which the converter reads and writes.
ST_DTYPES: dict[str, torch.dtype] = {
    code: DTYPES[code] for code in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def config_dict(config: Any) -> dict[str, Any]:
    """A transformers config as the plain dict the converter reads (``model_type`` included)."""
    data = config.to_dict()
    data["model_type"] = config.model_type
    return data


class DenseCheckpoint:
    """A local model folder opened for lazy reads. Use as a context manager (closes file handles)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(
                f"{self.folder}: not a folder; SRC must be a local Hugging Face model folder (for a Hub repo, "
                f"download it first: moe-patch pull REPO_ID --local-dir DIR)."
            )
        from moe_patch.detect.config import load_config

        # transformers' own config class reads config.json (no remote code); moe-patch's one config loader checks it
        hf_config = load_config(self.folder)
        self.config = config_dict(hf_config)
        self.tensors: dict[str, TensorEntry] = {}
        headers = self._headers()
        self.files = list(headers)
        for name, header in headers.items():
            for key, entry in header.items():
                if entry.dtype not in TORCH_TO_ST:
                    raise CheckpointError(f"{self.folder / name}: tensor {key} has unsupported dtype {entry.dtype}.")
                self.tensors[key] = entry
        self._reader = Checkpoint(self.folder, self.tensors)
        self._check_against(hf_config)

    # -- discovery -------------------------------------------------------------------------------
    def _headers(self) -> dict[str, dict[str, TensorEntry]]:
        """Weight file name -> its header: the shards the index lists (checked against it), else every
        ``*.safetensors`` file of the folder."""
        index = self.folder / INDEX_NAME
        if index.is_file():
            return read_shards(read_index(index), advice="Download the complete checkpoint.")
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = (
                f" It has {', '.join(pickles)}: moe-patch reads only safetensors (pickle can run code); convert "
                "them first, e.g. load with transformers and save_pretrained(..., safe_serialization=True)."
                if pickles
                else ""
            )
            raise CheckpointError(f"{self.folder}: no .safetensors weights found.{hint}")
        return {name: read_header(self.folder / name) for name in files}

    def _check_against(self, config: Any) -> None:
        """Every tensor of the model ``config`` describes is here, in the shape the config implies (tied ones may be
        absent). Otherwise transformers would initialise the missing ones at random when it loads the output, or
        refuse its shapes: the upcycled model could not be right, with or without verification."""
        from moe_patch.detect.config import meta_model

        model = meta_model(config)  # built on the meta device: no memory, nothing read
        tied = set(getattr(model, "all_tied_weights_keys", None) or ())
        vocab = getattr(config.get_text_config(), "vocab_size", None)
        heads = {
            f"{n}.weight"
            for n, m in model.named_modules()
            if m is not None and m in (model.get_input_embeddings(), model.get_output_embeddings())
        }
        for key, expected in model.state_dict().items():
            info = self.tensors.get(key)
            if info is None and key in tied:
                continue
            if info is None:
                why = "transformers would initialise it at random, so the upcycled model could not match the source"
                if key in heads and not config.tie_word_embeddings:
                    why = (
                        "config.json has tie_word_embeddings=false, so the output head is a tensor of its own and "
                        "transformers would initialise it at random; add it, or set tie_word_embeddings=true if "
                        "the head is the input embedding"
                    )
                raise CheckpointError(f"{self.folder}: tensor {key!r} is missing from the checkpoint; {why}.")
            if info.shape != tuple(expected.shape):
                if key in heads and info.shape[1:] == tuple(expected.shape[1:]) and vocab == expected.shape[0]:
                    raise CheckpointError(
                        f"{self.folder}: config.json vocab_size = {vocab} but {key} has {info.shape[0]} rows; "
                        "transformers cannot load such a model (nor the upcycled one). Set vocab_size to the "
                        "embedding's rows if the weights are right."
                    )
                raise CheckpointError(
                    f"{self.folder}: tensor {key} has shape {list(info.shape)}, config.json implies "
                    f"{list(expected.shape)}; the weights do not match the config."
                )

    # -- reads -----------------------------------------------------------------------------------
    def __enter__(self) -> DenseCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file descriptors the reads opened (no file is memory-mapped)."""
        self._reader.close()

    def info(self, key: str) -> TensorEntry:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(
                f"{self.folder}: tensor {key!r} is missing from the checkpoint; it does not match its config.json."
            ) from None

    def has(self, key: str) -> bool:
        return key in self.tensors

    def read(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Read ``key`` (optionally a block of rows/columns) as stored on disk.

        Only the bytes of the block are read, with positional reads: a memory-mapped shard would keep
        every page it touched in this process's RSS until the end (measured: RSS grew by the source size).
        """
        info = self.info(key)
        t = self._reader.read_block(info, rows, cols)
        # every weight passes here once on its way to the output: a NaN or inf would be copied into every expert
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{self.folder / info.file}: tensor {key} holds NaN or infinite values ({bad} of {t.numel()} read); "
                "a model computed from it cannot be right. Re-download or repair the checkpoint."
            )
        return t

    @property
    def floating_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating tensors use (the output default)."""
        counts: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                n = 1
                for d in info.shape:
                    n *= d
                counts[info.dtype] = counts.get(info.dtype, 0) + n
        return max(counts, key=counts.get) if counts else torch.float32
