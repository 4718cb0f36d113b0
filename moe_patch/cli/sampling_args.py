"""The sampling arguments of ``run`` and ``chat``; they fill :class:`moe_patch.serve.sampling.Sampling`, the one
sampling settings class of the CLI and the server, within the same limits the server accepts."""

from __future__ import annotations

import argparse

from ..serve import limits


def add_sampling_arguments(parser: argparse.ArgumentParser, greedy_default: bool) -> None:
    """``--temperature --top-p --top-k --repetition-penalty --seed``, validated by :mod:`moe_patch.serve.limits`."""
    g = parser.add_argument_group(
        "sampling",
        "default: greedy decoding" if greedy_default else "default: the checkpoint's generation_config.json",
    )
    g.add_argument(
        "--temperature",
        "--temp",
        type=limits.TEMPERATURE.argparse_type(),
        help="0 = greedy; > 0 samples at that temperature",
    )
    g.add_argument("--top-p", type=limits.TOP_P.argparse_type(), help="nucleus sampling: keep this probability mass")
    g.add_argument("--top-k", type=limits.TOP_K.argparse_type(), help="sample among the k most likely tokens")
    g.add_argument(
        "--repetition-penalty",
        type=limits.REPETITION_PENALTY.argparse_type(),
        help="> 1 discourages repeating tokens (also with greedy decoding)",
    )
    g.add_argument("-s", "--seed", type=limits.SEED.argparse_type(), help="seed for reproducible sampling")
