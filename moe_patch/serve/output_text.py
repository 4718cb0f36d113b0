"""The text one generation's tokens make, cut where a stop string begins, and what of it may be sent so far.

OpenAI's API (and llama-server, vLLM) leave the stop string out of the answer and end it with
``finish_reason: "stop"``; a stream must never send text that a later token turns into the start of a stop string.
So after each token the whole generated text is decoded (exact with any tokenizer: no per-token pieces that a
tokenizer may join differently) and split three ways:

- sent: released before;
- releasable: up to the first stop string found (then generation ends), or else up to the longest end of the text
  that could still grow into a stop string (``"</s"`` while ``"</stop>"`` is one), and never a trailing U+FFFD (a
  character whose bytes are not all generated yet);
- held back: the rest, released at the end if no stop string completes it.

Stop strings of any number and length work with any tokenizer (transformers' ``StopStringCriteria`` needs a
tokenizer that can spell ``abcdef``; ``stops.py`` said why). Each token's log-probabilities, when asked for, are
released with the text they made, so a stream's ``logprobs`` never describe text it has not sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: What a tokenizer decodes bytes that do not yet form a whole character to.
REPLACEMENT = "\ufffd"


def held_back(text: str, start: int, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` (not before ``start``) could be the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def first_stop(text: str, start: int, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text[start:]`` begins, None if there is none."""
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else None


@dataclass
class Release:
    """What one token made sendable: text and the log-probability entries of the tokens that text completes, each as
    (where the token's text begins, the entry)."""

    text: str = ""
    logprobs: list[tuple[int, Any]] = field(default_factory=list)


class OutputText:
    """The text of one generation, fed one token at a time with :meth:`add`."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` released
        self.ends: list[int] = []  # per token: the length of the text once it was added
        self.stop_at: int | None = None  # where the stop string that ended the generation begins
        self._logprobs: list[Any] = []
        self._logprobs_sent = 0

    @property
    def stopped(self) -> bool:
        """Whether a stop string was generated (the generation ends here)."""
        return self.stop_at is not None

    def add(self, token_id: int, logprob: Any = None) -> Release:
        """Take the next generated token (and its log-probability entry, if asked for)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.ends.append(len(self.text))
        if logprob is not None:  # kept with where the token's text begins (OpenAI's `text_offset`)
            self._logprobs.append((self.ends[-2] if len(self.ends) > 1 else 0, logprob))
        if self.stops:
            # an earlier stop string would have ended the generation: only text not yet released can hold one
            # (released text never holds the beginning of one, see `held_back`)
            self.stop_at = first_stop(self.text, self.sent, self.stops)
        if self.stop_at is not None:
            return self._release(self.stop_at, final=True)
        end = len(self.text) - held_back(self.text, self.sent, self.stops)
        while end > self.sent and self.text[end - 1] == REPLACEMENT:
            end -= 1
        return self._release(end)

    def finish(self) -> Release:
        """Everything not yet released (the generation ended without a stop string, or at one)."""
        return self._release(self.stop_at if self.stop_at is not None else len(self.text), final=True)

    @property
    def final_text(self) -> str:
        return self.text[: self.stop_at] if self.stop_at is not None else self.text

    def _release(self, end: int, final: bool = False) -> Release:
        end = max(end, self.sent)
        piece = self.text[self.sent : end]
        self.sent = end
        # a token's entry goes with the text that completes it; at the end, every token whose text begins before the
        # cut (the tokens after a stop string, and an end-of-sequence token, which adds no text, are left out)
        n = self._logprobs_sent
        while n < len(self._logprobs) and (self.ends[n - 1] if n else 0) < end and (final or self.ends[n] <= end):
            n += 1
        entries, self._logprobs_sent = self._logprobs[self._logprobs_sent : n], n
        return Release(piece, entries)
