"""``moe-patch run``: generate with experts offloaded, as ``llama-cli`` does.

stdout holds only the generated text, streamed as it is generated (or, with ``--json``, one JSON document);
everything else (progress, what was chosen at load, the statistics) goes to stderr, and ``-q`` drops it.
Ctrl-C stops the generation at the next token and keeps what was generated (exit status 130). The loading
arguments (budgets, device, dtype, cache policy, threads) that ``serve`` and ``chat`` share are in
:mod:`.offload_args`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from .args import int_at_least, non_empty, plot_file, prompt_file, token_ids
from .offload_args import add_offload_arguments, load_offloaded
from .sampling_args import add_sampling_arguments

DEFAULT_NEW_TOKENS = 32
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program Ctrl-C stopped


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate with routed experts paged from the checkpoint (expert offloading)",
        description="Load PATH (a safetensors checkpoint directory or Hub repo id) with its routed experts left "
        "on disk and generate from the prompt (greedily unless sampling is asked for). The text streams to "
        "stdout as it is generated; progress and the offload statistics go to stderr (-q drops them). Ctrl-C "
        "stops and keeps what was generated (exit status 130).",
    )
    add_offload_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", type=non_empty, help="prompt text (needs the checkpoint's tokenizer)")
    src.add_argument(
        "-f", "--file", type=prompt_file, metavar="FILE", help="read the prompt from FILE ('-': from standard input)"
    )
    src.add_argument(
        "--prompt-ids", type=token_ids, help="comma-separated token ids, for checkpoints without a tokenizer"
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="put the prompt in the tokenizer's chat template as a user message (an instruction-tuned model "
        "answers it) instead of continuing the text",
    )
    p.add_argument(
        "-n",
        "--max-new-tokens",
        type=int_at_least(1),
        default=None,
        help=f"tokens to generate (default {DEFAULT_NEW_TOKENS}, cut to what the context leaves; a value "
        "that does not fit is refused)",
    )
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int_at_least(1),
        default=None,
        help="tokens of context this run may use, prompt plus generated (default: the model's context); "
        "--expert-cache auto leaves room for the KV cache of the tokens this run can reach",
    )
    add_sampling_arguments(p, greedy_default=True)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only the generated text: no progress, no statistics"
    )
    p.add_argument("--plot", metavar="PNG", type=plot_file, help="write a heatmap of expert utilisation per layer")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document instead of the text: the text, its token ids, the statistics",
    )
    p.set_defaults(func=run)


# -- before the model loads: the path, the config, the prompt -----------------------------------------------------
def _prompt_text(args: argparse.Namespace) -> str | None:
    return args.prompt if args.prompt is not None else args.file


def _prompt(args: argparse.Namespace, path: Path, context: int | None):
    """(tokenizer or None, prompt ids of shape [1, n], n >= 1)."""
    import torch

    from ..serve.tokenizer import chat_input_ids, load_tokenizer, require_chat_template
    from ..sizes import format_bytes
    from ..text import byte_limit

    text = _prompt_text(args)
    if args.chat and text is None:
        raise InvalidArgumentError("--chat puts the prompt text in the chat template; it cannot take --prompt-ids.")
    if text is None:
        return None, torch.tensor([args.prompt_ids])
    size, limit = len(text.encode("utf-8", "surrogateescape")), byte_limit(context)
    if size > limit:  # not worth tokenizing: far more than the context holds
        holder = f"a context of {context} tokens" if context else "a prompt"
        raise InvalidArgumentError(
            f"the prompt is {format_bytes(size)}; {holder} holds far less, so it was not "
            f"tokenized (the limit is {format_bytes(limit)})."
        )
    tokenizer = load_tokenizer(path, instead="pass --prompt-ids instead")
    if args.chat:
        require_chat_template(tokenizer, args.path, "--chat")
        ids = torch.tensor([chat_input_ids(tokenizer, [{"role": "user", "content": text}])])
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise InvalidArgumentError(f"the prompt {text[:40]!r} gives no tokens with this tokenizer; write some text.")
    return tokenizer, ids


def _decoding_tokenizer(path: Path):
    """The checkpoint's tokenizer if it has one (to print text for --prompt-ids), else None."""
    from ..serve.tokenizer import has_tokenizer_files, load_tokenizer

    if not has_tokenizer_files(path):
        return None
    try:
        return load_tokenizer(path, instead="")
    except OSError:  # CheckpointError: no usable tokenizer; the ids are printed instead
        return None


def _check_vocabulary(ids, config, args: argparse.Namespace) -> None:
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and int(ids.max()) >= vocab:
        flag = "--prompt-ids" if args.prompt_ids is not None else "the prompt (its tokenizer)"
        raise InvalidArgumentError(
            f"{flag}: token id {int(ids.max())} is outside the vocabulary of {args.path}: ids must lie in [0, {vocab})."
        )


def _context(config, args: argparse.Namespace) -> int | None:
    """The context this run may use: ``--ctx-size`` (at most the model's), else the model's."""
    from ..serve.context import context_length

    model = context_length(config)
    if args.ctx_size is not None and model is not None and args.ctx_size > model:
        raise InvalidArgumentError(
            f"--ctx-size {args.ctx_size}: the model's context is {model} tokens; give at most {model}."
        )
    return args.ctx_size or model


def _new_tokens(ids, context: int | None, args: argparse.Namespace) -> int:
    """The number of tokens to generate (what the context leaves for a default length)."""
    from ..serve.context import ContextLengthError, new_token_budget

    explicit = args.max_new_tokens is not None
    try:
        return new_token_budget(ids.shape[1], context, args.max_new_tokens or DEFAULT_NEW_TOKENS, explicit)
    except ContextLengthError as exc:
        message = str(exc).replace("the model's context", "the context" if args.ctx_size else "the model's context")
        raise ContextLengthError(f"{'--max-new-tokens: ' if explicit else ''}{message}") from None


# -- output ----------------------------------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: JSON has no such numbers (``jq`` and most
    parsers refuse Python's ``NaN`` literal)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _finish_reason(new_ids: list[int], wanted: int, interrupted: bool, eos: Any) -> str:
    if interrupted:
        return "interrupted"
    ends = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return "stop" if (new_ids and new_ids[-1] in ends) or len(new_ids) < wanted else "length"


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _progress(total: int, args: argparse.Namespace):
    """A progress bar on stderr, where it does not mix with streamed text on one terminal (--json, or stdout
    redirected); tqdm leaves it out when stderr is not a terminal."""
    if args.quiet or (sys.stdout.isatty() and not args.json):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", desc="generating", file=sys.stderr, disable=None, leave=False)


def run(args: argparse.Namespace) -> int:
    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    from ..detect.config import load_config
    from ..offload.loading import resolve_checkpoint

    path = resolve_checkpoint(args.path)  # first: a wrong folder, a GGUF file or an offline repo id is named as such
    config = load_config(path)
    context = _context(config, args)
    tokenizer, ids = _prompt(args, path, context)
    _check_vocabulary(ids, config, args)
    new_tokens = _new_tokens(ids, context, args)

    from ..offload import get_offload_handle
    from ..serve.sampling import Sampling, generation_config
    from .streaming import generate_interruptibly, token_streamer

    model = load_offloaded(args, path, context_tokens=ids.shape[1] + new_tokens)
    if tokenizer is None:
        tokenizer = _decoding_tokenizer(path)
    handle = get_offload_handle(model)
    try:
        ids = ids.to(args.device)
        sampling = Sampling.from_mapping(args)
        gen_config = generation_config(model, sampling, new_tokens, greedy_default=True)
        sampling.seeded()
        bar = _progress(new_tokens, args)
        streamer = token_streamer(
            tokenizer, (lambda _: None) if args.json else _stdout_write, bar.update if bar is not None else None
        )
        try:
            generated = generate_interruptibly(model, ids, gen_config, streamer)
        finally:
            if bar is not None:
                bar.close()
        if not args.json:
            _stdout_write("\n")
        return _report(args, handle, generated, streamer.ids, ids.shape[1], new_tokens, tokenizer, gen_config)
    finally:
        handle.detach(restore_weights=False)


def _report(args, handle, generated, new_ids: list[int], prompt_tokens: int, wanted: int, tokenizer, gen_config) -> int:
    """The statistics (stderr, or in the JSON document), the quantization error and the plot."""
    import torch

    stats = handle.stats
    figures = stats.to_dict()  # before the error measurement's forwards count in
    shown = str(stats)
    reason = _finish_reason(new_ids, wanted, generated.interrupted, gen_config.eos_token_id)
    error = None
    if args.quantize and not generated.interrupted:  # the logit error the quantized experts cause, on this sequence
        with torch.no_grad():
            error = {
                "format": args.quantize,
                "tokens": generated.sequence.shape[1],
                **handle.quantization_error(generated.sequence),
            }
    plotted = stats.plot_utilisation(args.plot) if args.plot else None
    if args.json:
        text = tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer is not None else None
        document = {
            "text": text,
            "token_ids": new_ids,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": len(new_ids),
            "finish_reason": reason,
            "statistics": figures,
        }
        if error is not None:
            document["quantization_error"] = error
        if plotted:
            document["plot"] = plotted
        print(json.dumps(_finite(document), indent=2, allow_nan=False))
    elif not args.quiet:
        err = sys.stderr
        print(f"prompt: {prompt_tokens} tokens; generated: {len(new_ids)} tokens ({reason})", file=err)
        print(shown, file=err)
        if error is not None:
            print(
                f"{args.quantize} experts: logit error on the {error['tokens']} tokens above, against full-precision "
                f"experts read from the checkpoint: max |dlogit| {error['max_abs']:.3g} ({error['max_rel']:.2%} of "
                f"the largest logit), top-1 agreement {error['top1_agreement']:.1%}",
                file=err,
            )
        if plotted:
            print(f"utilisation plot: {plotted}", file=err)
    if generated.interrupted:
        if not args.quiet:
            print(
                f"moe-patch run: interrupted after {len(new_ids)} generated tokens; what was generated is kept.",
                file=sys.stderr,
            )
        return INTERRUPTED
    return 0
