"""Choosing each next token of one request inside a batch, as ``generate()`` would choose it for that request alone.

The batched decode loop (``engine.py``) runs one forward for every request in the batch, then each request picks its
own next token from its row of logits with its own settings. That pick is ``generate()``'s, built from the same
public pieces in the same order (transformers' ``_get_logits_processor``): logit bias (``sequence_bias``), repetition
penalty, then, when sampling, temperature, top-k, top-p and min-p; greedy is the arg-max of the processed scores,
sampling a draw from their softmax. Settings ``generate()`` has and this loop does not (beam search, n-gram bans,
forced tokens, ...) are named by :func:`step_loop_refusal`; such a request runs through ``generate()`` itself.

Each request samples from a ``torch.Generator`` of its own, seeded with its ``seed``: a concurrent request cannot
move its draws, and a seeded request draws what ``generate()`` after ``set_seed(seed)`` draws (the same Mersenne
Twister stream on the CPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig

#: generate()'s values for settings neither the request nor the checkpoint sets (its `_get_default_generation_params`,
#: private, so the few that matter here are written down).
GENERATE_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}

# settings the step loop carries out
IMPLEMENTED = {
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "sequence_bias",
    "eos_token_id",
    "stop_strings",
}
# settings that cannot change the tokens of one greedy or sampled sequence
NO_EFFECT = {
    "bos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_logits",
    "output_scores",
    "return_dict_in_generate",
    "transformers_version",
    "_from_model_config",
    "max_length",
    "length_penalty",
    "early_stopping",
    "cache_implementation",
    "cache_config",
    "compile_config",
    "disable_compile",
    "max_cache_len",
    "low_memory",
    "continuous_batching_config",
    "renormalize_logits",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
    "is_assistant",
}
# settings that change the tokens unless they hold one of these values
NEUTRAL = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "num_beam_groups": (None, 1),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "guidance_scale": (None, 1.0),
    "remove_invalid_values": (None, False),
    "diversity_penalty": (None, 0.0),
    "token_healing": (None, False),
    "use_mtp": (None, False),
}


def effective_config(config: GenerationConfig, model_config: GenerationConfig) -> GenerationConfig:
    """``config`` with what it leaves unset taken from the checkpoint's generation config, then from generate()'s
    defaults: the settings ``generate(generation_config=config)`` runs with."""
    out = copy.deepcopy(config)
    for key, value in model_config.to_dict().items():
        if getattr(out, key, None) is None and value is not None:
            setattr(out, key, value)
    for key, value in GENERATE_DEFAULTS.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    return out


def step_loop_refusal(config: GenerationConfig) -> str | None:
    """The first setting of ``config`` that the batched loop does not carry out (then ``generate()`` runs the
    request), None if it carries out all of them."""
    for key, value in config.to_diff_dict().items():
        if key in IMPLEMENTED or key in NO_EFFECT:
            continue
        if key in NEUTRAL and value in NEUTRAL[key]:
            continue
        if value is None:
            continue
        return key
    return None


def eos_ids(config: GenerationConfig) -> frozenset[int]:
    eos = config.eos_token_id
    return frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before any sampling setting) and its ``top`` most
    likely alternatives, as (token id, log-probability)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class TokenChooser:
    """Picks one request's next token from its row of logits (``config``: :func:`effective_config`'s)."""

    def __init__(
        self,
        config: GenerationConfig,
        device: torch.device | str,
        seed: int | None = None,
        top_logprobs: int | None = None,
    ):
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            SequenceBiasLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.sample = bool(config.do_sample)
        self.top_logprobs = top_logprobs  # None: no log-probabilities; 0: the chosen token's only
        steps = LogitsProcessorList()
        if config.sequence_bias:
            steps.append(SequenceBiasLogitsProcessor(sequence_bias=config.sequence_bias))
        if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
            steps.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if self.sample:
            if config.temperature is not None and config.temperature != 1.0:
                steps.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None and config.top_k != 0:
                steps.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
            if config.top_p is not None and config.top_p < 1.0:
                steps.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
            if config.min_p is not None:
                steps.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
        self.steps = steps
        self.generator = None
        if self.sample:
            self.generator = torch.Generator(device=device)
            if seed is None:
                self.generator.seed()  # a fresh random seed: unseeded requests do not repeat each other
            else:
                self.generator.manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply first and no log-probabilities: the arg-max of the raw logits, which the
        engine takes for all such rows of a batch at once (one device sync instead of one per row)."""
        return not self.sample and not self.steps and self.top_logprobs is None

    def choose(self, ids: list[int], logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token after ``ids`` (prompt and generated so far) from ``logits`` (the vocabulary's scores, 1-D,
        any float dtype), and its log-probability entry when asked for."""
        raw = logits.reshape(1, -1).float()  # generate() computes in fp32 too
        scores = raw
        if self.steps:
            scores = self.steps(torch.tensor([ids], device=raw.device), raw.clone())
        if self.sample:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
        else:
            token = int(torch.argmax(scores, dim=-1))
        return token, (self._logprob(raw[0], token) if self.top_logprobs is not None else None)

    def _logprob(self, raw: torch.Tensor, token: int) -> TokenLogprob:
        logp = torch.log_softmax(raw, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.top_logprobs:
            values, ids = torch.topk(logp, self.top_logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(logp[token]), top)
