"""Reading a dense Hugging Face checkpoint lazily: config, safetensors headers, tensor slices.

Only safetensors are read (never pickle). Headers are checked up front, so a missing or truncated
shard is reported before anything is written; tensors are read one slice at a time with
``safe_open(...).get_slice`` so memory stays at the size of the slice being converted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_patch.errors import CheckpointError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

#: safetensors dtype names <-> torch dtypes (the subset checkpoints use).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what its header says."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


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
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for name in self.files:
            self._read_header(name)
        self._check_against(hf_config)

    # -- discovery -------------------------------------------------------------------------------
    def _weight_files(self) -> list[str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except OSError as exc:
                raise CheckpointError(f"{index}: cannot read the safetensors index ({exc.strerror}).") from None
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: malformed safetensors index ({exc!r}).") from None
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{self.folder}: shard(s) {', '.join(missing)} listed in {INDEX_NAME} are missing; "
                    "download the complete checkpoint."
                )
            self._index_map = weight_map
            return files
        self._index_map = None
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
        return files

    def _read_header(self, name: str) -> None:
        # The package's one safetensors header reader: it tells a missing, unreadable, truncated or
        # malformed shard apart and names the file and tensor.
        from moe_patch.offload.checkpoint import read_header

        path = self.folder / name
        for key, entry in read_header(path).items():
            if entry.dtype not in TORCH_TO_ST:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {entry.dtype}.")
            self.tensors[key] = TensorInfo(name, entry.shape, entry.dtype)
        if self._index_map is not None:
            stray = [k for k, v in self._index_map.items() if v == name and k not in self.tensors]
            if stray:
                raise CheckpointError(f"{path}: tensors {stray[:3]} listed in {INDEX_NAME} are not in the file.")

    def _check_against(self, config: Any) -> None:
        """Every tensor of the model ``config`` describes is here, in the shape the config implies (tied ones may be
        absent). Otherwise transformers would initialise the missing ones at random when it loads the output, or
        refuse its shapes: the upcycled model could not be right, with or without verification."""
        from moe_patch.detect.config import meta_model

        model = meta_model(config)  # built on the meta device: no memory, nothing read
        tied = set(getattr(model, "all_tied_weights_keys", None) or ())
        vocab = getattr(config.get_text_config(), "vocab_size", None)
        heads = {f"{n}.weight" for n, m in model.named_modules()
                 if m is not None and m in (model.get_input_embeddings(), model.get_output_embeddings())}
        for key, expected in model.state_dict().items():
            info = self.tensors.get(key)
            if info is None and key in tied:
                continue
            if info is None:
                why = "transformers would initialise it at random, so the upcycled model could not match the source"
                if key in heads and not config.tie_word_embeddings:
                    why = ("config.json has tie_word_embeddings=false, so the output head is a tensor of its own and "
                           f"transformers would initialise it at random; add it, or set tie_word_embeddings=true if "
                           "the head is the input embedding")
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
        """Nothing stays open between reads; kept so callers can manage the checkpoint as a resource."""

    def info(self, key: str) -> TensorInfo:
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

        The file is opened for this read only: a handle kept open maps the shard, and every page it
        touched would stay in this process's RSS until the end (measured: RSS grew by the source size).
        """
        from safetensors import safe_open

        info = self.info(key)
        with safe_open(self.folder / info.file, framework="pt") as f:
            sl = f.get_slice(key)
            if rows is None and cols is None:
                t = sl[:]
            elif cols is None:
                t = sl[rows]
            else:
                t = sl[rows if rows is not None else slice(None), cols]
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
