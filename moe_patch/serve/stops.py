"""Stop strings (a request's ``stop``) that work with any tokenizer.

transformers' ``StopStringCriteria`` matches stop strings token by token against a "clean" vocabulary that it
builds by decoding every token after the prefix ``abcdef``; a tokenizer that cannot spell that prefix (a word-level
vocabulary, one without those letters) makes it raise ``ValueError: substring not found``, which the server
answered with a 500 for every request with ``stop``. It is used wherever it can be built (it is vectorised and
cached per vocabulary); otherwise :class:`DecodedStopCriteria` decodes the generated tokens and looks for the stop
strings in the text, which is what a stop string means.

Generation ends after the token that completes a stop string; the answer still contains it (OpenAI's API leaves it
out: that is the local-inference issue's to change).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

logger = logging.getLogger("moe_patch.serve")


class DecodedStopCriteria(StoppingCriteria):
    """Stops a sequence once the text decoded from its tokens after ``prompt_tokens`` contains a stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_tokens: int):
        self.tokenizer, self.stops, self.prompt_tokens = tokenizer, tuple(stops), prompt_tokens
        self.longest = max(len(s) for s in self.stops)
        self.searched: dict[int, int] = {}  # sequence -> characters of its text already searched

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = []
        for row, ids in enumerate(input_ids):
            text = self.tokenizer.decode(ids[self.prompt_tokens:], skip_special_tokens=True)
            # only the new end can complete a stop string; a few characters more, as decoding the longer sequence
            # may change the last ones (a multi-byte character completed, a prefix space dropped)
            start = max(0, self.searched.get(row, 0) - self.longest - 8)
            done.append(any(stop in text[start:] for stop in self.stops))
            self.searched[row] = len(text)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def stop_criteria(tokenizer: Any, stops: Sequence[str], prompt_tokens: int) -> StoppingCriteria:
    """transformers' token-level criterion where this tokenizer allows it, else the decoding one."""
    try:
        return StopStringCriteria(tokenizer, list(stops))
    except Exception as exc:  # noqa: BLE001 - any failure to build its vocabulary table: the decoding way is exact
        logger.debug("stop strings matched on decoded text (transformers' StopStringCriteria: %r)", exc)
        return DecodedStopCriteria(tokenizer, stops, prompt_tokens)


class ModelWithStops:
    """The served model as transformers' generation manager sees it for one request: ``generate()`` also stops at
    the request's stop strings (transformers' manager builds generate()'s arguments itself, with no place for
    stopping criteria; everything else is the model's own)."""

    def __init__(self, model: Any, tokenizer: Any, stops: Sequence[str], prompt_tokens: int):
        self._model, self._tokenizer, self._stops, self._prompt_tokens = model, tokenizer, stops, prompt_tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, *args: Any, stopping_criteria: StoppingCriteriaList | None = None, **kwargs: Any) -> Any:
        # built here, on the inference thread: transformers' table for a large vocabulary takes a moment
        criteria = StoppingCriteriaList([*(stopping_criteria or []),
                                         stop_criteria(self._tokenizer, self._stops, self._prompt_tokens)])
        return self._model.generate(*args, stopping_criteria=criteria, **kwargs)
