"""Sampling settings: one dataclass for `run`, `chat` and the server, and the rule that turns it into a
``GenerationConfig``.

The rule, everywhere: ``temperature 0`` is greedy decoding; ``temperature > 0``, ``top_p`` or ``top_k``
switch sampling on (transformers' server only sets the fields, so a model whose generation config says
``do_sample: false`` stayed greedy whatever temperature a request asked for); ``repetition_penalty``
applies to both. Settings left out keep the base configuration's value.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GenerationConfig


@dataclass(frozen=True)
class Sampling:
    """Overrides of a base generation config (None: keep the base's)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None  # applied by whoever runs generate(), right before it (see `seeded`)

    @classmethod
    def from_mapping(cls, values: Any) -> Sampling:
        """From an argparse namespace or a request body (already validated against :mod:`.limits`)."""
        get = values.get if isinstance(values, dict) else lambda name: getattr(values, name, None)
        return cls(**{f.name: get(f.name) for f in fields(cls)})

    def apply(self, config: GenerationConfig, greedy_default: bool = False) -> GenerationConfig:
        """A copy of ``config`` with these overrides and the sampling rule of the module docstring;
        ``greedy_default``: decode greedily when no setting asks for sampling (``run``'s default)."""
        out = copy.deepcopy(config)
        samples = False if greedy_default else None
        if self.temperature is not None:
            samples = self.temperature > 0
            if samples:
                out.temperature = self.temperature
        for name in ("top_p", "top_k"):
            value = getattr(self, name)
            if value is not None:
                setattr(out, name, value)
                samples = samples or self.temperature is None
        if samples is not None:
            out.do_sample = samples
        if samples is False:  # greedy: unused sampling settings only make generate() warn on every call
            out.temperature = out.top_p = out.top_k = None
        if self.repetition_penalty is not None:
            out.repetition_penalty = self.repetition_penalty
        return out

    def seeded(self) -> None:
        """Seed every RNG generate() draws from (transformers' ``set_seed``), if a seed was given."""
        if self.seed is not None:
            from transformers import set_seed

            set_seed(self.seed)


def generation_config(model: Any, sampling: Sampling, max_new_tokens: int, *, greedy_default: bool = False):
    """The model's generation config with ``sampling`` applied, ``max_new_tokens`` and a pad token (the
    end-of-sequence token when the model names none, as generate() would, with a warning each time)."""
    config = sampling.apply(model.generation_config, greedy_default=greedy_default)
    config.max_new_tokens = max_new_tokens
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return config
