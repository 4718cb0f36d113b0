"""Local inference with offloaded experts: ``moe-patch serve`` (OpenAI-compatible HTTP) and ``moe-patch chat``.

The server is transformers' own (``transformers.cli.serving``) with ``moe_patch.load_model`` as its
loader; see docs/serve.md. Importing this package needs no serving library: ``app``, ``handlers``,
``generation`` and ``loader`` need the ``serve`` extra (``pip install 'moe-patch[serve]'``).

    loader.py      transformers' ModelManager loading through moe_patch.load_model, pinned to one model
    generation.py  one generation at a time on the engine; admission, per-request seed, statistics
    handlers.py    transformers' chat / completion handlers with the request checks and sampling rule
    schema.py      what a request may contain (refuses what would be silently ignored)
    errors.py      OpenAI-shaped error bodies for every failure
    auth.py        the API key; query values kept out of the access log
    request_size.py  request bodies bounded before they are parsed (413)
    stops.py       stop strings with any tokenizer
    app.py         the FastAPI app (transformers' build_server) with /stats and the routes kept
    stats.py       offload figures per generation and in total
    context.py     how many new tokens fit in the model's context
    limits.py      the accepted range of every numeric setting (CLI and HTTP alike)
    sampling.py    sampling settings -> GenerationConfig
    tokenizer.py   the checkpoint's tokenizer and chat template
    chat.py        the terminal chat
    preflight.py   what `serve` checks before loading: its libraries, the API key, the socket

The `serve` and `chat` subcommands are moe_patch/cli/serve.py.
"""
