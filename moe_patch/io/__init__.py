"""The one floor that reads checkpoint files: safetensors headers, the shard index, positional reads.

    safetensors.py  one file's header, checked against the file (DTYPES, TensorEntry, read_header)
    index.py        model.safetensors.index.json and its agreement with the shards (read_index, read_shards)
    checkpoint.py   a checkpoint folder opened for positional reads of whole tensors, rows or blocks
    direct.py       reads past the page cache (O_DIRECT) and the rule for when a run uses them

It imports nothing of moe-patch but :mod:`moe_patch.errors`: offload, detect, converters and hub_scripts
all stand on it. Only safetensors is read, never pickle.
"""

from .checkpoint import Checkpoint, checkpoint_entries
from .index import INDEX_NAME, ShardIndex, read_index, read_shards
from .safetensors import DTYPES, TensorEntry, read_header

__all__ = [
    "DTYPES",
    "INDEX_NAME",
    "Checkpoint",
    "ShardIndex",
    "TensorEntry",
    "checkpoint_entries",
    "read_header",
    "read_index",
    "read_shards",
]
