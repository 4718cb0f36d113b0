"""``moe-patch serve`` (an OpenAI-compatible server) and ``moe-patch chat`` (a terminal chat)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..serve import limits
from ..serve.auth import QueryValuesFilter
from ..serve.preflight import API_KEY_ENV, api_key, bind, is_loopback, require_serving_dependencies
from .args import int_at_least, non_empty, size
from .offload_args import add_offload_arguments, load_offloaded, offload_options
from .sampling_args import add_sampling_arguments

logger = logging.getLogger("moe_patch.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve",
        help="serve a checkpoint with offloaded experts over an OpenAI-compatible HTTP API",
        description="Load PATH with its routed experts paged from disk and serve /v1/chat/completions, "
        "/v1/completions, /v1/models and /stats (offload figures) on HOST:PORT. Up to --parallel requests are "
        "decoded together in one batch; prompts that begin like an earlier sequence reuse its cached prefix.",
    )
    add_offload_arguments(s)
    s.add_argument(
        "--host",
        type=non_empty,
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    s.add_argument("--port", type=limits.PORT.argparse_type(), default=8000, help="port (default 8000)")
    s.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require `Authorization: Bearer KEY` on every request; prefer the {API_KEY_ENV} "
        "environment variable (command lines are visible to other users)",
    )
    s.add_argument(
        "--served-model-name",
        metavar="NAME",
        type=non_empty,
        nargs="+",
        help="the model's names in the API, the first in every answer (default: PATH as given)",
    )
    s.add_argument(
        "--alias",
        metavar="NAME",
        type=non_empty,
        action="append",
        help="another name requests may use for the model (repeatable)",
    )
    s.add_argument(
        "--strict-model-name",
        action="store_true",
        help="refuse (404 model_not_found) a request naming another model; by default any name is "
        "answered by the one model served, as llama-server does",
    )
    s.add_argument(
        "--parallel",
        metavar="N",
        type=int_at_least(1),
        default=4,
        help="requests decoded together in one batch (default 4); more wait in the queue",
    )
    s.add_argument(
        "--max-queue",
        metavar="N",
        type=int_at_least(1),
        default=64,
        help="requests that may wait for the batch (default 64); beyond, 503 with Retry-After",
    )
    s.add_argument(
        "--prompt-cache",
        metavar="SIZE",
        type=size(),
        default="1GiB",
        help="keys and values of recent sequences kept for prompts that begin like them, on the model's "
        "device (default 1GiB; 0: off)",
    )
    s.add_argument(
        "--max-request-bytes",
        metavar="SIZE",
        type=size(minimum=1),
        help="refuse (413) request bodies larger than this, before reading them (default: 32 bytes per "
        "token of the model's context, at least 1MiB)",
    )
    s.set_defaults(func=serve)

    c = subparsers.add_parser(
        "chat",
        help="chat in the terminal with a checkpoint whose experts are offloaded",
        description="Load PATH with its routed experts paged from disk and chat: each turn goes through the "
        "tokenizer's chat template, tokens print as they are generated. Type !help for the commands "
        "(!stats prints the offload statistics).",
    )
    add_offload_arguments(c)
    add_sampling_arguments(c, greedy_default=False)
    c.add_argument("--system", metavar="TEXT", type=non_empty, help="system prompt")
    c.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=512,
        help="longest reply in tokens (default 512, cut to what the model's context leaves)",
    )
    c.add_argument(
        "--verbose-prompt",
        action="store_true",
        help="print the token ids sent to the model before each reply (to check the chat template)",
    )
    c.set_defaults(func=chat)


def serve(args: argparse.Namespace) -> int:
    require_serving_dependencies()
    key = api_key(args.api_key)
    sock = bind(args.host, args.port)
    if key is None and not is_loopback(args.host):
        logger.warning(
            "moe-patch serve: listening on %s without an API key: anyone who can reach this machine "
            "can use the model (set %s).",
            args.host,
            API_KEY_ENV,
        )
    import uvicorn

    from ..serve.app import build_app
    from ..serve.loader import close_served, open_served
    from ..serve.names import ServedNames
    from ..sizes import parse_size

    served = None
    try:
        from ..offload.loading import resolve_checkpoint

        path = resolve_checkpoint(args.path)  # before the tokenizer: a wrong path is named as such
        names = ServedNames(
            (*(args.served_model_name or [args.path]), *(args.alias or [])), strict=args.strict_model_name
        )
        served = open_served(
            path,
            names=names,
            options=offload_options(args),
            dtype=args.dtype,
            max_batch=args.parallel,
            max_queue=args.max_queue,
            prompt_cache_bytes=parse_size(args.prompt_cache, name="--prompt-cache"),
        )
        limit = parse_size(args.max_request_bytes, name="--max-request-bytes") if args.max_request_bytes else None
        app = build_app(served, api_key=key, max_request_bytes=limit)
        where = f"[{args.host}]" if ":" in args.host else args.host
        logger.info(
            "moe-patch serve: %s at http://%s:%d/v1 (up to %d requests in a batch%s%s)",
            names.primary,
            where,
            args.port,
            args.parallel,
            f"; {served.engine.batchable}: one at a time through generate()" if served.engine.batchable else "",
            "; API key required" if key else "",
        )
        config = uvicorn.Config(app, log_level="info")  # configures uvicorn's loggers: the filter goes on after
        logging.getLogger("uvicorn.access").addFilter(QueryValuesFilter())
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
        logger.info("moe-patch serve: stopped.")
    finally:
        sock.close()
        if served is not None:
            close_served(served)
    return 0


def chat(args: argparse.Namespace) -> int:
    from ..offload.loading import resolve_checkpoint
    from ..serve.chat import ChatSession
    from ..serve.tokenizer import load_tokenizer, require_chat_template

    path = resolve_checkpoint(args.path)  # before the tokenizer: a wrong path is named as such
    tokenizer = load_tokenizer(path, instead="moe-patch chat needs the checkpoint's tokenizer")
    require_chat_template(tokenizer, args.path, "moe-patch chat")
    session = ChatSession(load_offloaded(args, path), tokenizer, args)
    if hasattr(sys.stdin, "reconfigure"):
        # bytes that are not UTF-8 arrive as escaped surrogates (not as an exception that loses the line), so the
        # session can name the first bad byte and go on
        sys.stdin.reconfigure(errors="surrogateescape")
    session.loop()
    return 0
