"""The values each numeric generation setting accepts, written once for every entry point.

`moe-patch run` and `moe-patch chat` read these through argparse (:meth:`Range.argparse_type`), the
server's request schema through pydantic (:meth:`Range.constraints`), so ``--top-p 0`` and
``{"top_p": 0}`` are refused with the same range in the message.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """``low`` (inclusive, or exclusive when ``low_open``) up to ``high`` (inclusive; None: unbounded)."""

    low: float
    high: float | None = None
    low_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def argparse_type(self) -> Callable[[str], Any]:
        """An argparse ``type=`` that accepts only values in the range (the message names the range)."""

        def parse(text: str):
            try:
                value = int(text) if self.integer else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
            if not self.contains(value):
                raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text}")
            return value

        parse.__name__ = self.describe()
        return parse

    def constraints(self) -> dict[str, Any]:
        """pydantic ``Field`` keyword arguments for the same range."""
        out: dict[str, Any] = {"gt" if self.low_open else "ge": self.low}
        if self.high is not None:
            out["le"] = self.high
        if not self.integer:
            out["allow_inf_nan"] = False
        return out


# temperature 0 means greedy decoding; top_k / repetition_penalty are transformers' own settings (also
# accepted by vLLM and llama.cpp's servers as extensions of the OpenAI request).
TEMPERATURE = Range(0.0)
TOP_P = Range(0.0, 1.0, low_open=True)
TOP_K = Range(1, integer=True)
REPETITION_PENALTY = Range(0.0, low_open=True)
SEED = Range(0, 2**63 - 1, integer=True)  # torch.manual_seed takes any 64-bit value; negatives read as typos
MAX_NEW_TOKENS = Range(1, integer=True)
# transformers' server maps OpenAI's frequency_penalty to repetition_penalty = 1 + value, which must stay > 0
FREQUENCY_PENALTY = Range(-1.0, 2.0, low_open=True)
PORT = Range(1, 65535, integer=True)
