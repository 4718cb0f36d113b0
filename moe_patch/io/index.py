"""The shard index of a sharded safetensors checkpoint (``model.safetensors.index.json``): which shard holds
which tensor, and the check that the index and its shards agree.

Every reader of sharded checkpoints (offload, inspect, upcycle, push) reads the index here, so a malformed
index, a missing shard or a tensor the index puts in the wrong shard is refused the same way everywhere,
naming the file and the tensor. What to do about it depends on where the checkpoint came from, so the
caller gives the advice (``Re-download the checkpoint.``, ``Re-run the conversion.``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .safetensors import TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
REDOWNLOAD = "Re-download the checkpoint."


@dataclass(frozen=True)
class ShardIndex:
    """A parsed index: ``weight_map`` maps each tensor key to its shard, a file name relative to the
    index's folder; ``total_size`` is the index's ``metadata.total_size`` when that is an integer."""

    path: Path
    weight_map: dict[str, str]
    total_size: int | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def shards(self) -> list[str]:
        """The shard files the index names, sorted."""
        return sorted(set(self.weight_map.values()))

    def keys_by_shard(self) -> dict[str, list[str]]:
        """Shard file -> the keys the index puts in it (index order), shards sorted by name."""
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        return dict(sorted(by_shard.items()))


def read_index(path: str | os.PathLike) -> ShardIndex:
    """Parse the index file at ``path`` (no shard is opened)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors index ({exc.strerror or exc}).") from exc
    except ValueError as exc:  # bad JSON or UTF-8
        raise CheckpointError(f"{path}: malformed safetensors index ({exc}).") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(
            f"{path}: malformed safetensors index (expected an object whose 'weight_map' maps "
            "each tensor name to its shard file name)."
        )
    metadata = data.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    total = total if isinstance(total, int) and not isinstance(total, bool) else None
    return ShardIndex(path, weight_map, total)


def read_shards(
    index: ShardIndex, *, complete: bool = False, advice: str = REDOWNLOAD
) -> dict[str, dict[str, TensorEntry]]:
    """The header of every shard ``index`` names (shard file -> its tensors), once the index and the shards
    are checked to agree: every named shard exists and holds every tensor the index puts in it; with
    ``complete``, the index also lists every tensor of every shard (a file about to be published must load
    as it will be read: through the index). ``advice`` ends each refusal."""
    by_shard = index.keys_by_shard()
    missing = [shard for shard in by_shard if not (index.folder / shard).is_file()]
    if missing:
        keys = by_shard[missing[0]]
        names = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        several = len(missing) > 1
        raise CheckpointError(
            f"{index.folder}: shard{'s' if several else ''} {names} listed in {index.path.name} "
            f"{'are' if several else 'is'} missing ({missing[0]} holds {keys[0]!r} and {len(keys) - 1} more "
            f"tensors). {advice}"
        )
    headers: dict[str, dict[str, TensorEntry]] = {}
    for shard, keys in by_shard.items():
        path = index.folder / shard
        header = headers[shard] = read_header(path)
        absent = [key for key in keys if key not in header]
        if absent:
            raise CheckpointError(
                f"{path}: tensor {absent[0]!r} is listed in {index.path.name} but absent from the "
                f"shard ({len(absent)} such tensors). {advice}"
            )
        unlisted = sorted(set(header) - set(keys)) if complete else []
        if unlisted:
            raise CheckpointError(
                f"{path}: tensor {unlisted[0]!r} is in the shard but {index.path.name} does not "
                f"list it there ({len(unlisted)} such tensors): the index and the shards come from "
                f"different saves. {advice}"
            )
    return headers
