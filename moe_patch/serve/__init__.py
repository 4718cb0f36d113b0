"""Local inference with offloaded experts: ``moe-patch serve`` (OpenAI-compatible HTTP) and ``moe-patch chat``.

The server is moe-patch's own (FastAPI and uvicorn, the ``serve`` extra) around one engine thread that decodes up
to ``--parallel`` requests in one batch; see docs/serve.md. Importing this package needs no serving library:
``app``, ``handlers`` and ``loader`` need the ``serve`` extra (``pip install '.[serve]'``).

    loader.py        the served model: tokenizer first, then the model loaded on the engine's thread
    engine.py        the one thread that runs the model: queue, prefill, batched decode, generate() alone
    kv.py            a batch's left-padded key/value cache: join, leave, one row out
    prompt_cache.py  caches of finished sequences, for prompts that begin like them
    sampler.py       each request's next token from its row of logits, as generate() would choose it
    output_text.py   a generation's text: cut at stop strings, held back while a stop string may begin
    handlers.py      the chat / completion routes: request -> token ids and generation config -> answer
    responses.py     OpenAI's answer shapes (JSON and server-sent events), usage, log-probabilities
    names.py         which model names a request may use (served names, aliases, any)
    schema.py        what a request may contain (refuses what would be silently ignored)
    errors.py        OpenAI-shaped error bodies for every failure
    auth.py          the API key; query values kept out of the access log
    request_size.py  request bodies bounded before they are parsed (413)
    app.py           the FastAPI app: routes, /stats, middlewares
    stats.py         offload figures per request and in total
    context.py       how many new tokens fit in the model's context
    limits.py        the accepted range of every numeric setting (CLI and HTTP alike)
    sampling.py      sampling settings -> GenerationConfig
    tokenizer.py     the checkpoint's tokenizer and chat template
    chat.py          the terminal chat
    preflight.py     what `serve` checks before loading: its libraries, the API key, the socket

The `serve` and `chat` subcommands are moe_patch/cli/serve.py.
"""
