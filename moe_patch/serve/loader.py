"""transformers' ``ModelManager`` with ``moe_patch.load_model`` as its loader.

The server is pinned to one checkpoint (transformers' ``force_model``): it is loaded once at start,
with its routed experts left on disk for the offload engine, and never unloaded while the server runs.
transformers' manager builds models with ``from_pretrained`` in ``_load_model`` and its tokenizer in
``_load_processor``; those two are the whole difference, so request handling, streaming and the
inference thread stay transformers' own.

The model is loaded on the server's inference thread, the thread every ``generate()`` runs on, so the
server process computes on one thread only: GNU OpenMP keeps a worker pool per thread that has run a
parallel region, and once more pools' threads exist than cores it stops spin-waiting between regions
(its throttled spin count), which made every decode step of a model loaded on the main thread and run
on the inference thread ~40% slower on 2 cores (``bench/serve.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.utils import InferenceThread

from ..offload import OffloadOptions, get_offload_handle
from .errors import RequestError
from .tokenizer import load_tokenizer


class OffloadModelManager(ModelManager):
    """Serves ``path`` under ``name``; ``options`` and ``dtype`` go to :func:`moe_patch.load_model`, which runs
    on ``thread`` (the inference thread the generations will run on; a new one if not given)."""

    def __init__(self, path: str | Path, *, name: str, options: OffloadOptions, dtype: str = "auto",
                 thread: InferenceThread | None = None):
        self.path, self.name, self.options, self.load_dtype = str(path), name, options, dtype
        self.thread = thread or InferenceThread()
        # before the model: a checkpoint without a tokenizer fails in seconds, not after loading
        self.tokenizer = load_tokenizer(path, instead="moe-patch serve needs the checkpoint's tokenizer")
        self.created = int(time.time())
        super().__init__(device=options.device, dtype=dtype, force_model=name, model_timeout=-1)

    def process_model_name(self, model_id: str) -> str:
        return model_id  # served under the name given, without transformers' "@main" revision suffix

    def check_name(self, model_id: str) -> None:
        """404 (OpenAI's ``model_not_found``) for any model but the one served."""
        if model_id != self.name:
            raise RequestError(f"the model {model_id!r} does not exist; this server serves {self.name!r}",
                               status=404, param="model", code="model_not_found")

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None) -> Any:
        self.check_name(model_id_and_revision)
        return self.tokenizer

    def _load_model(self, model_id_and_revision: str, tqdm_class: Any = None, progress_callback: Any = None,
                    gguf_file: str | None = None) -> Any:
        self.check_name(model_id_and_revision)
        from ..offload import load_model

        return self.thread.submit(load_model, self.path, options=self.options, dtype=self.load_dtype).result()

    @property
    def model(self) -> Any:
        return self.loaded_models[self.name].model

    def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
        # transformers lists every model of the Hub cache; this server answers for one
        return [{"id": self.name, "object": "model", "created": self.created, "owned_by": "moe-patch"}]

    def shutdown(self) -> None:
        for timed in list(self.loaded_models.values()):
            handle = get_offload_handle(timed.model) if timed.model is not None else None
            if handle is not None:
                handle.detach(restore_weights=False)  # stops the engine's reader threads
        super().shutdown()
