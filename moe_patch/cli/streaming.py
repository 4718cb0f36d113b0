"""Generation the way a terminal program runs it: tokens handed out as they are generated, and Ctrl-C stops
the generation at the next token, keeping what it made.

The text comes from transformers' own ``TextStreamer`` logic (a piece is released once it decodes to whole
characters and words, so a multi-byte character is never cut), recorded as token ids as well. ``generate()``
runs on a worker thread and a stopping criterion ends it when Ctrl-C arrives on the main thread, so the
offload engine is never interrupted in the middle of a forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..threads import release_idle_team

Write = Callable[[str], None]


def token_streamer(tokenizer: Any, write: Write, on_token: Callable[[], None] | None = None) -> Any:
    """A ``generate(streamer=...)`` streamer that skips the prompt, records the new ids (``.ids``) and hands each
    piece of text to ``write``: decoded text with a ``tokenizer``, the ids themselves separated by spaces
    without one. ``on_token`` is called once per generated token (a progress bar)."""
    from transformers import TextStreamer
    from transformers.generation.streamers import BaseStreamer

    tick = on_token or (lambda: None)

    if tokenizer is None:

        class _IdStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.ids: list[int] = []
                self._prompt_seen = False

            def put(self, value) -> None:
                if not self._prompt_seen:  # generate() streams the prompt first
                    self._prompt_seen = True
                    return
                new = value.reshape(-1).tolist()
                write(("" if not self.ids else " ") + " ".join(map(str, new)))
                self.ids.extend(new)
                tick()

            def end(self) -> None:
                pass

        return _IdStreamer()

    class _TextStreamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.ids: list[int] = []

        def put(self, value) -> None:
            if not self.next_tokens_are_prompt:
                self.ids.extend(value.reshape(-1).tolist())
                tick()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                write(text)

    return _TextStreamer()


def stop_on(event: threading.Event) -> Any:
    """A stopping criterion that ends generation at the next token once ``event`` is set."""
    import torch
    from transformers import StoppingCriteria

    class _StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return _StopOnEvent()


@dataclass
class Generated:
    """What ``generate()`` returned (prompt and new tokens, ``[1, n]``), and whether Ctrl-C stopped it."""

    sequence: Any
    interrupted: bool


def generate_interruptibly(model: Any, input_ids: Any, generation_config: Any, streamer: Any) -> Generated:
    """``model.generate`` on a worker thread; Ctrl-C on the calling (main) thread stops it at the next token and
    the tokens made so far are kept. A second Ctrl-C while it winds down is not caught."""
    import torch

    stop, done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                result["sequence"] = model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=generation_config,
                    streamer=streamer,
                    stopping_criteria=[stop_on(stop)],
                )
        except BaseException as exc:  # re-raised on the calling thread
            failure.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=work, name="moe-patch-generate", daemon=True)
    release_idle_team()  # the worker's OpenMP team is then the only one (moe_patch.threads)
    worker.start()
    interrupted = False
    # An Event, not Thread.join: a join that Ctrl-C interrupts can leave the thread looking finished (CPython 3.11)
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        while not done.wait(0.1):
            pass
    # done is set: the thread is only unwinding now. Wait for it, or the interpreter may exit while it tears down
    # its native thread state (an OpenMP team of the CPU kernels): "terminate called", exit 134, 1 run in 10
    worker.join()
    if failure:
        raise failure[0]
    return Generated(result["sequence"], interrupted)
