"""The served model: its tokenizer, then the model itself loaded by ``moe_patch.load_model`` on the engine's
thread (``engine.py`` says why that thread), and everything the routes need of it (``handlers.Served``).

The tokenizer is loaded first: a checkpoint without one fails in seconds, not after the model has loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .context import context_length
from .engine import Engine
from .handlers import Served
from .names import ServedNames
from .tokenizer import load_tokenizer


def open_served(
    path: str | Path,
    *,
    names: ServedNames,
    options: Any,
    dtype: str = "auto",
    max_batch: int = 4,
    max_queue: int = 64,
    prompt_cache_bytes: int = 0,
) -> Served:
    """Load ``path`` (experts offloaded as ``options`` say) and start its engine."""
    from ..offload import load_model

    tokenizer = load_tokenizer(path, instead="moe-patch serve needs the checkpoint's tokenizer")
    engine = Engine(
        lambda: load_model(str(path), options=options, dtype=dtype),
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        prompt_cache_bytes=prompt_cache_bytes,
    )
    model = engine.start()
    return Served(engine, tokenizer, names, context_length(model.config), model.generation_config)


def close_served(served: Served) -> None:
    """Stop the engine (waiting and running requests end with an error) and the offload engine's reader threads."""
    from ..offload import get_offload_handle

    engine = served.engine
    engine.close()
    handle = get_offload_handle(engine.model) if engine.model is not None else None
    if handle is not None:
        handle.detach(restore_weights=False)
