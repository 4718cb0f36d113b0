"""``moe-patch run``: generate with experts offloaded, show a progress bar and the statistics.

The loading arguments (budgets, device, dtype, cache policy) that ``serve`` and ``chat`` share with ``run``
are in :mod:`.offload_args`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InvalidArgumentError
from .args import int_at_least, non_empty, plot_file, token_ids
from .offload_args import add_offload_arguments, load_offloaded
from .sampling_args import add_sampling_arguments

DEFAULT_NEW_TOKENS = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate with routed experts paged from the checkpoint (expert offloading)",
        description="Load PATH (a safetensors checkpoint directory or Hub repo id) with its routed experts left "
        "on disk, generate from --prompt (greedily unless sampling is asked for), print the text and the "
        "offload statistics.",
    )
    add_offload_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", type=non_empty, help="prompt text (needs the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", type=token_ids, help="comma-separated token ids, for checkpoints without a tokenizer")
    p.add_argument("--chat", action="store_true",
                   help="put --prompt in the tokenizer's chat template as a user message (an instruction-tuned model "
                   "answers it) instead of continuing the text")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                   help=f"tokens to generate (default {DEFAULT_NEW_TOKENS}, cut to what the model's context leaves; "
                   "a value that does not fit is refused)")
    add_sampling_arguments(p, greedy_default=True)
    p.add_argument("--plot", metavar="PNG", type=plot_file, help="write a heatmap of expert utilisation per layer")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run)


def _progress_streamer(total: int):
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class _Bar(BaseStreamer):
        def __init__(self):
            self.bar = tqdm(total=total, unit="tok", desc="generating", file=sys.stderr)
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first streams the prompt
                self.prompt_seen = True
                return
            self.bar.update(1)

        def end(self):
            self.bar.close()

    return _Bar()


def _prompt(args: argparse.Namespace):
    """(tokenizer or None, prompt ids of shape [1, n], n >= 1)."""
    import torch

    from ..serve.tokenizer import chat_input_ids, load_tokenizer, require_chat_template

    if args.chat and args.prompt is None:
        raise InvalidArgumentError("--chat puts --prompt text in the chat template; it cannot take --prompt-ids.")
    if args.prompt is None:
        return None, torch.tensor([args.prompt_ids])
    tokenizer = load_tokenizer(args.path, instead="pass --prompt-ids instead")
    if args.chat:
        require_chat_template(tokenizer, args.path, "--chat")
        ids = torch.tensor([chat_input_ids(tokenizer, [{"role": "user", "content": args.prompt}])])
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise InvalidArgumentError(f"--prompt {args.prompt!r}: the tokenizer gives no tokens; write some text.")
    return tokenizer, ids


def _decoding_tokenizer(path: str):
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
        flag = "--prompt-ids" if args.prompt is None else "--prompt (its tokenizer)"
        raise InvalidArgumentError(
            f"{flag}: token id {int(ids.max())} is outside the vocabulary of {args.path}: ids must lie in [0, {vocab})."
        )


def _check_prompt(ids, config, args: argparse.Namespace) -> int:
    """The config checks (vocabulary, context); returns the number of tokens to generate."""
    from ..serve.context import ContextLengthError, context_length, new_token_budget

    _check_vocabulary(ids, config, args)
    explicit = args.max_new_tokens is not None
    try:
        return new_token_budget(ids.shape[1], context_length(config), args.max_new_tokens or DEFAULT_NEW_TOKENS,
                                explicit)
    except ContextLengthError as exc:
        raise ContextLengthError(f"{'--max-new-tokens: ' if explicit else ''}{exc}") from None


def run(args: argparse.Namespace) -> int:
    tokenizer, ids = _prompt(args)  # before the model loads: a bad prompt costs nothing
    local = Path(args.path).is_dir()
    if local:
        from ..detect.config import load_config

        new_tokens = _check_prompt(ids, load_config(args.path), args)  # the config checks every entry point runs

    import torch

    from ..offload import get_offload_handle
    from ..serve.sampling import Sampling, generation_config

    model = load_offloaded(args)
    if not local:
        new_tokens = _check_prompt(ids, model.config, args)
    if tokenizer is None:
        tokenizer = _decoding_tokenizer(args.path)
    handle = get_offload_handle(model)
    ids = ids.to(args.device)
    sampling = Sampling.from_mapping(args)
    config = generation_config(model, sampling, new_tokens, greedy_default=True)
    sampling.seeded()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             streamer=_progress_streamer(new_tokens))
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, new.tolist()))
    print(text)
    stats = handle.stats
    shown = stats.to_dict() if args.json else str(stats)  # before the error measurement's forwards count in
    plotted = stats.plot_utilisation(args.plot) if args.plot else None
    if args.quantize:  # what the README promises: the logit error the quantized experts cause, on this sequence
        with torch.no_grad():
            error = {"format": args.quantize, "tokens": out.shape[1], **handle.quantization_error(out)}
    if args.json:
        print(json.dumps({**shown, **({"quantization_error": error} if args.quantize else {})}, indent=2))
    else:
        print(shown)
        if args.quantize:
            print(f"{args.quantize} experts: logit error on the {error['tokens']} tokens above, against full-precision "
                  f"experts read from the checkpoint: max |dlogit| {error['max_abs']:.3g} ({error['max_rel']:.2%} of "
                  f"the largest logit), top-1 agreement {error['top1_agreement']:.1%}")
    if plotted:
        print(f"utilisation plot: {plotted}")
    handle.detach(restore_weights=False)
    return 0
