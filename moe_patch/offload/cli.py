"""``moe-patch run``: generate with experts offloaded, show a progress bar and the statistics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import device, int_at_least, non_empty, plot_file, size, token_ids
from ..errors import CheckpointError, InvalidArgumentError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate with routed experts paged from the checkpoint (expert offloading)",
        description="Load PATH (a safetensors checkpoint directory or Hub repo id) with its routed experts left "
        "on disk, generate greedily from --prompt, and print the offload statistics.",
    )
    p.add_argument("path", help="checkpoint directory or Hub repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", type=non_empty, help="prompt text (needs the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", type=token_ids, help="comma-separated token ids, for checkpoints without a tokenizer")
    p.add_argument("--expert-cache", type=size(), default=None, help="device-cache budget, e.g. 8GiB (default: no limit)")
    p.add_argument("--host-cache", type=size(), default="0", help="host-RAM cache budget, e.g. 32GiB (default 0: off)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:n] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default auto: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None, help="keep experts quantized in the caches")
    p.add_argument("--policy", choices=["lru", "lfu", "pinned-hot"], default="lru")
    p.add_argument("--no-prefetch", action="store_true", help="switch the next-layer prefetch off")
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


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tekken.json")


def _prompt(args: argparse.Namespace):
    """(tokenizer or None, prompt ids of shape [1, n], n >= 1)."""
    import torch

    if args.prompt is None:
        return None, torch.tensor([args.prompt_ids])
    local = Path(args.path)
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer here (no error, no tokens)
        raise CheckpointError(f"{args.path}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...); "
                              "pass --prompt-ids instead.")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.path, local_files_only=local.is_dir())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{args.path}: no usable tokenizer ({exc}); pass --prompt-ids instead.") from exc
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise InvalidArgumentError(f"--prompt {args.prompt!r}: the tokenizer gives no tokens; write some text.")
    return tokenizer, ids


def _check_vocabulary(ids, config, args: argparse.Namespace) -> None:
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and int(ids.max()) >= vocab:
        flag = "--prompt-ids" if args.prompt is None else "--prompt (its tokenizer)"
        raise InvalidArgumentError(
            f"{flag}: token id {int(ids.max())} is outside the vocabulary of {args.path}: ids must lie in [0, {vocab})."
        )


def run(args: argparse.Namespace) -> int:
    tokenizer, ids = _prompt(args)  # before the model loads: a bad prompt costs nothing
    local = Path(args.path).is_dir()
    if local:
        from ..detect.config import load_config

        _check_vocabulary(ids, load_config(args.path), args)  # the config checks every entry point runs

    import torch

    from . import get_offload_handle, load_model
    from .options import OffloadOptions

    opts = OffloadOptions(
        device=args.device, expert_cache=args.expert_cache, host_cache=args.host_cache,
        quantize_experts=args.quantize, prefetch=not args.no_prefetch, policy=args.policy,
    )
    model = load_model(args.path, device=args.device, options=opts, dtype=args.dtype)
    if not local:
        _check_vocabulary(ids, model.config, args)
    handle = get_offload_handle(model)
    ids = ids.to(args.device)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else 0
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False,
            streamer=_progress_streamer(args.max_new_tokens), pad_token_id=pad,
        )
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, new.tolist()))
    print(text)
    stats = handle.stats
    print(json.dumps(stats.to_dict(), indent=2) if args.json else stats)
    if args.plot:
        print(f"utilisation plot: {stats.plot_utilisation(args.plot)}")
    handle.detach(restore_weights=False)
    return 0
