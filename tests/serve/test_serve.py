"""Local inference as people use it: `moe-patch serve` with a real OpenAI client, `moe-patch chat` in a
terminal, sampling and the chat template in `moe-patch run`.

One tiny Mixtral checkpoint (random weights, a context of 256 tokens) with a word-level tokenizer and a
chat template, both built here; the server is started once for the module, as a user starts it, on a
free loopback port, with experts paged through a two-expert device cache and a host cache. Every greedy
answer is compared with transformers' ``generate()`` on the same checkpoint loaded fully resident, one request
at a time, including answers the server decoded in one batch with other clients' requests.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_patch.cli import main
from tests.cli.terminal_helpers import in_terminal_session
from tests.helpers.offload import VOCAB, build, expert_bytes
from tests.helpers.tokenizer import save_word_tokenizer

openai = pytest.importorskip("openai")

MOE_PATCH = Path(sys.executable).with_name("moe-patch")  # the console script of this environment
KEY = "sk-test-5f0c2a91d7"  # must never show in the server's output
NAME = "tiny-moe"
ALIAS = "tiny-alias"
CONTEXT = 256
HELLO = [{"role": "user", "content": "w5 w6 w7"}]


# -- the checkpoint and its resident reference ---------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = build("mixtral")
    model.config.max_position_embeddings = CONTEXT
    path = tmp_path_factory.mktemp("serve") / "tiny-chat-moe"
    model.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)
    return path


@dataclass
class Reference:
    model: object
    tokenizer: object

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        )

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)
        return out[0, len(ids) :].tolist()

    def answer(self, messages: list[dict], new_tokens: int) -> tuple[str, int]:
        """(text, token count) of the greedy answer: the text names every token but a final <eos>."""
        new = self.greedy(self.chat_ids(messages), new_tokens)
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def ref(checkpoint) -> Reference:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return Reference(
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(checkpoint),
    )


def offload_flags() -> list[str]:
    one = expert_bytes("mixtral")
    return ["--dtype", "float32", "--expert-cache", f"{2 * one}B", "--host-cache", f"{3 * one}B"]


# -- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """One raw HTTP request (POST when there is a body): (status, JSON answer)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@dataclass
class Server:
    url: str
    log: Path

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def stats(self) -> dict:
        status, body = call(f"{self.url}/stats")
        assert status == 200
        return body

    def record(self, request_id: str) -> dict:
        return next(r for r in self.stats()["requests"] if r["request_id"] == request_id)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "MOE_PATCH_API_KEY": KEY, "OMP_NUM_THREADS": "1"}  # the key as users should pass it
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(MOE_PATCH),
                "serve",
                str(checkpoint),
                "--port",
                str(port),
                "--served-model-name",
                NAME,
                "--alias",
                ALIAS,
                "--parallel",
                "4",
                *offload_flags(),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"moe-patch serve exited:\n{log.read_text()}"
        try:
            if call(f"{url}/health")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"moe-patch serve did not answer within 120 s:\n{log.read_text()}")
        time.sleep(0.25)
    yield Server(url, log)
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]  # Ctrl-C is a clean stop
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("moe-patch serve did not stop on Ctrl-C")


def ask(server: Server, messages=HELLO, max_tokens: int = 12, **kw):
    return server.client().chat.completions.create(
        model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


def streamed(server: Server, messages=HELLO, max_tokens: int = 12, **kw) -> tuple[str, object]:
    """(text joined from the deltas, final chunk)."""
    pieces, last = [], None
    for chunk in server.client().chat.completions.create(
        model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, stream=True, **kw
    ):
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), last


# -- the OpenAI API --------------------------------------------------------------------------------------------
def test_models_lists_the_served_names(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME, ALIAS]
    assert client.models.retrieve(NAME).id == NAME and client.models.retrieve(ALIAS).id == ALIAS


@pytest.mark.parametrize("model", [NAME, ALIAS, "gpt-4o", "whatever/the-client-was-set-up-with"])
def test_any_model_name_is_answered_by_the_one_model_as_llama_server_does(server, ref, model):
    answer = server.client().chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == ref.answer(HELLO, 8)[0]
    assert answer.model == NAME  # the client learns what answered


def test_greedy_chat_completion_gives_generates_tokens(server, ref):
    answer = ask(server, max_tokens=24)
    text, count = ref.answer(HELLO, 24)
    assert answer.choices[0].message.content == text
    assert answer.usage.completion_tokens == count
    assert answer.usage.prompt_tokens == len(ref.chat_ids(HELLO))  # the chat template was applied
    assert answer.choices[0].finish_reason == ("length" if count == 24 else "stop")
    assert answer.model == NAME
    assert answer.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_completion_gives_generates_tokens(server, ref):
    messages = [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "w9 w10 w11 w12"}]
    text, last = streamed(server, messages, max_tokens=24)
    expected, count = ref.answer(messages, 24)
    assert text == expected
    assert last.usage.completion_tokens == count and last.choices[0].finish_reason in ("length", "stop")


def test_stream_ends_with_done_line(server):
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions",
        data=json.dumps({"messages": HELLO, "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3


def test_text_completion_gives_generates_tokens(server, ref):
    answer = server.client().completions.create(model=NAME, prompt="w20 w21 w22", max_tokens=10, temperature=0)
    new = ref.greedy(ref.tokenizer("w20 w21 w22")["input_ids"], 10)
    assert answer.choices[0].text == ref.tokenizer.decode(new, skip_special_tokens=True)
    assert answer.usage.completion_tokens == len(new)


def test_stats_report_the_engines_figures_per_request_and_in_total(server):
    before = server.stats()["cumulative"]
    messages = [{"role": "user", "content": "w90 w91 w92 w93"}]  # a prompt nothing cached begins with
    answer = ask(server, messages, max_tokens=16)
    stats = server.stats()
    record = next(r for r in stats["requests"] if r["request_id"] == answer.id)
    fig = record["offload"]
    assert record["prompt_tokens"] == answer.usage.prompt_tokens
    assert record["completion_tokens"] == answer.usage.completion_tokens and record["path"] == "batched"
    assert record["cached_prompt_tokens"] == answer.usage.prompt_tokens_details.cached_tokens
    assert record["time_to_first_token_s"] > 0 and record["mean_batch"] == 1.0  # alone
    computed = answer.usage.prompt_tokens - record["cached_prompt_tokens"]
    assert fig["generations"] == 1 and fig["prefill_tokens"] == (computed if computed > 1 else 0)
    assert fig["decode_tokens"] == answer.usage.completion_tokens - 1  # the first token comes from the prefill
    assert fig["decode_tokens_per_s"] > 0 and 0 <= fig["hit_rate"] <= 1
    assert set(fig["decode_bytes_per_token"]) == {"device", "host", "disk"}
    assert fig["decode_bytes_per_token"]["disk"] > 0  # a two-expert device cache pages from the checkpoint
    assert fig["fraction_of_bound"] is None or fig["fraction_of_bound"] > 0
    total = stats["cumulative"]
    assert total["generations"] == before["generations"] + 1 and total["requests"] == before["requests"] + 1
    assert total["decode_tokens"] == before["decode_tokens"] + fig["decode_tokens"]
    assert total["completion_tokens"] == before["completion_tokens"] + answer.usage.completion_tokens
    engine = stats["engine_report"]  # the engine's own report (OffloadStats.to_dict) since the server started
    assert len(engine["layers"]) == 2 and engine["disk_bytes_total"] > 0
    assert stats["scheduling"].startswith("up to 4 requests decoded together") and stats["max_batch"] == 4
    assert stats["waiting"] == 0 and stats["running"] == [] and stats["prompt_cache"]["entries"] >= 1


# -- bad requests: a 4xx with OpenAI's error body, and the server keeps serving -------------------------------------
LONG = " ".join(["w8"] * (CONTEXT + 10))


@pytest.mark.parametrize(
    "body, key, status, code, param",
    [
        pytest.param(b'{"messages": [', KEY, 400, None, None, id="malformed-json"),
        pytest.param(b"[1, 2]", KEY, 400, None, None, id="body-not-an-object"),
        pytest.param({"model": NAME}, KEY, 400, "missing_required_parameter", "messages", id="missing-messages"),
        pytest.param({"messages": []}, KEY, 400, "invalid_value", "messages", id="no-messages"),
        pytest.param(
            {"messages": [{"role": "wizard", "content": "x"}]},
            KEY,
            400,
            "invalid_value",
            "messages.0.role",
            id="unknown-role",
        ),
        pytest.param(
            {"messages": HELLO, "max_tokens": 0}, KEY, 400, "invalid_value", "max_tokens", id="zero-max-tokens"
        ),
        pytest.param(
            {"messages": HELLO, "max_tokens": -3}, KEY, 400, "invalid_value", "max_tokens", id="negative-max-tokens"
        ),
        pytest.param(
            {"messages": HELLO, "max_tokens": "12"}, KEY, 400, "invalid_value", "max_tokens", id="max-tokens-as-text"
        ),
        pytest.param(
            {"messages": HELLO, "temperature": -1}, KEY, 400, "invalid_value", "temperature", id="negative-temperature"
        ),
        pytest.param({"messages": HELLO, "top_p": 0}, KEY, 400, "invalid_value", "top_p", id="zero-top-p"),
        pytest.param(
            {"messages": [{"role": "user", "content": LONG}]},
            KEY,
            400,
            "context_length_exceeded",
            None,
            id="prompt-longer-than-the-context",
        ),
        pytest.param(
            {"messages": HELLO, "max_tokens": CONTEXT},
            KEY,
            400,
            "context_length_exceeded",
            None,
            id="prompt-plus-max-tokens-past-the-context",
        ),
        pytest.param({"messages": HELLO}, "sk-wrong", 401, "invalid_api_key", None, id="wrong-api-key"),
        pytest.param({"messages": HELLO}, None, 401, "invalid_api_key", None, id="missing-api-key"),
        pytest.param({"messages": HELLO, "n": 2}, KEY, 400, "unsupported_parameter", "n", id="unsupported-n"),
        pytest.param(
            {"messages": HELLO, "top_logprobs": 2},
            KEY,
            400,
            "invalid_value",
            "top_logprobs",
            id="top-logprobs-without-logprobs",
        ),
        pytest.param(
            {"messages": HELLO, "logprobs": True, "top_logprobs": 21},
            KEY,
            400,
            "invalid_value",
            "top_logprobs",
            id="too-many-top-logprobs",
        ),
        pytest.param(
            {"messages": HELLO, "logit_bias": {"999999": 5}},
            KEY,
            400,
            "invalid_value",
            "logit_bias",
            id="logit-bias-outside-the-vocabulary",
        ),
        pytest.param(
            {"messages": HELLO, "response_format": {"type": "json_object"}},
            KEY,
            400,
            "unsupported_parameter",
            "response_format",
            id="unsupported-json-mode",
        ),
        pytest.param(
            {"messages": HELLO, "max_token": 5}, KEY, 400, "unknown_parameter", "max_token", id="misspelt-field"
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            KEY,
            400,
            "invalid_value",
            None,
            id="image-for-a-text-model",
        ),
    ],
)
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, ref, body, key, status, code, param):
    got, answer = call(f"{server.url}/v1/chat/completions", body, key=key)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert KEY not in json.dumps(answer)
    assert ask(server, max_tokens=6).choices[0].message.content == ref.answer(HELLO, 6)[0]


def test_the_openai_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": LONG}])


def test_unknown_route_and_text_completion_errors(server):
    status, answer = call(f"{server.url}/v1/embeddings", {"input": "x"})
    assert status == 404 and "/v1/embeddings" in answer["error"]["message"]
    status, answer = call(f"{server.url}/reset", {})  # would unload the served model
    assert status == 404
    status, answer = call(f"{server.url}/v1/completions", {"prompt": "", "max_tokens": 3})
    assert status == 400 and answer["error"]["param"] == "prompt"
    status, answer = call(f"{server.url}/v1/completions", {"prompt": "w5", "logprobs": 6})
    assert status == 400 and answer["error"]["param"] == "logprobs"
    status, answer = call(f"{server.url}/v1/completions", {"prompt": "w5", "suffix": "w9"})  # no infill format
    assert status == 400 and answer["error"]["code"] == "unsupported_parameter"


# -- stop strings: left out of the answer, which ends with finish_reason "stop" ----------------------------------------
def test_a_stop_string_is_left_out_and_the_answer_is_generates_text_cut_there(server, ref):
    full, count = ref.answer(HELLO, 24)
    words = full.split()
    assert len(words) >= 6, full
    for stop in (
        f"{words[2]} {words[3]}",  # across two tokens
        f"{words[3][1:]} {words[4][:2]}",  # from inside one token into the next
        words[4],
    ):  # one token
        cut = full[: full.index(stop)]
        for kw in (
            {"stop": stop},
            {"stop": ["never-generated", stop, "w99999"]},
            {"extra_body": {"generation_config": json.dumps({"stop_strings": [stop]})}},
        ):  # transformers' way
            answer = ask(server, max_tokens=24, **kw)
            assert answer.choices[0].message.content == cut and answer.choices[0].finish_reason == "stop"
            text, last = streamed(server, max_tokens=24, **kw)
            assert text == cut and last.choices[0].finish_reason == "stop"
    # a stop string the answer never completes changes nothing
    answer = ask(server, max_tokens=24, stop=["w1 w2 w3 w4 never"])
    assert answer.choices[0].message.content == full
    assert answer.choices[0].finish_reason == ("length" if count == 24 else "stop")


def test_a_stop_string_in_a_text_completion_is_left_out(server, ref):
    new = ref.greedy(ref.tokenizer("w20 w21 w22")["input_ids"], 12)
    full = ref.tokenizer.decode(new, skip_special_tokens=True)
    stop = " ".join(full.split()[3:5])
    for stream in (False, True):
        got = server.client().completions.create(
            model=NAME, prompt="w20 w21 w22", max_tokens=12, temperature=0, stop=[stop], stream=stream
        )
        text = "".join(c.choices[0].text for c in got) if stream else got.choices[0].text
        assert text == full[: full.index(stop)]


# -- concurrency: requests decoded together, each with the tokens it gets alone -------------------------------------
@pytest.mark.parametrize("clients", [2, 4])
def test_concurrent_clients_each_get_the_tokens_they_get_alone(server, ref, clients):
    prompts = [
        [{"role": "user", "content": " ".join(f"w{30 + 7 * i + j}" for j in range(1 + 3 * i))}] for i in range(clients)
    ]  # prompts of different lengths: the batch is left-padded
    lengths = [40 - 6 * i for i in range(clients)]  # answers of different lengths: requests leave the batch
    results: dict[int, tuple[str, str]] = {}
    start = threading.Barrier(clients)

    def one(i: int) -> None:
        start.wait()
        if i % 2:
            text, last = streamed(server, prompts[i], max_tokens=lengths[i])
            results[i] = (text, last.id)
        else:
            answer = ask(server, prompts[i], max_tokens=lengths[i])
            results[i] = (answer.choices[0].message.content, answer.id)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(clients))
    for i, (text, _) in results.items():
        assert text == ref.answer(prompts[i], lengths[i])[0]
    batches = [server.record(rid)["mean_batch"] or 1 for _, rid in results.values()]
    assert max(batches) > 1  # they were decoded together, not one after another


def test_a_disconnected_stream_stops_and_the_next_request_is_unaffected(server, ref):
    stream = server.client().chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=200, temperature=0, stream=True
    )
    chunks = iter(stream)
    first = next(chunks)
    next(chunks), next(chunks)
    stream.close()  # the client goes away mid-stream
    answer = ask(server, max_tokens=24)  # decoded beside the cancelled one, or after it left
    assert answer.choices[0].message.content == ref.answer(HELLO, 24)[0]
    cancelled = server.record(first.id)["offload"]
    assert cancelled["decode_tokens"] < 150  # stopped, not run to its 200 tokens


def test_a_seed_gives_the_same_sample_even_while_another_request_runs(server, ref):
    def sample(seed: int | None, tokens: int = 12) -> str:
        return (
            server.client()
            .chat.completions.create(
                model=NAME, messages=HELLO, max_tokens=tokens, temperature=1.0, top_p=0.95, seed=seed
            )
            .choices[0]
            .message.content
        )

    alone = sample(1234)
    # temperature > 0 samples although the checkpoint's generation config says do_sample=False
    assert alone != ref.answer(HELLO, 12)[0]
    other = threading.Thread(target=sample, args=(None, 120))  # samples from the global RNG meanwhile
    other.start()
    time.sleep(0.2)
    assert sample(1234) == alone
    other.join(timeout=120)


def test_the_api_key_never_reaches_the_log(server):
    log = server.log.read_text()
    assert "401" in log and KEY not in log  # unauthorised requests were logged, the key was not


# -- prompt-prefix reuse across turns ----------------------------------------------------------------------------------
def test_a_three_turn_chat_reuses_the_previous_turns_prompt_with_the_tokens_of_a_fresh_run(server, ref):
    conversation = [{"role": "system", "content": "w100 w101 w102 w103 w104 w105"}]
    previous_prompt = None
    for turn, line in enumerate(["w40 w41 w42", "w43 w44", "w45 w46 w47 w48"]):
        conversation.append({"role": "user", "content": line})
        answer = ask(server, conversation, max_tokens=10)
        expected, _ = ref.answer(conversation, 10)
        assert answer.choices[0].message.content == expected  # as a fresh run
        record = server.record(answer.id)
        assert record["cached_prompt_tokens"] == answer.usage.prompt_tokens_details.cached_tokens
        if previous_prompt is not None:
            assert record["cached_prompt_tokens"] >= 0.9 * previous_prompt, (turn, record, previous_prompt)
        previous_prompt = answer.usage.prompt_tokens
        conversation.append({"role": "assistant", "content": answer.choices[0].message.content})
    assert server.stats()["cumulative"]["cached_prompt_tokens"] > 0


# -- log-probabilities ---------------------------------------------------------------------------------------------
def test_chat_logprobs_are_the_models_own(server, ref):
    answer = ask(server, max_tokens=6, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    ids = ref.chat_ids(HELLO)
    new = ref.greedy(ids, 6)
    with torch.no_grad():
        logp = torch.log_softmax(ref.model(torch.tensor([ids + new])).logits[0], dim=-1)
    shown = [t for t in new if t != 2]  # the end-of-sequence token adds no text and no entry
    assert [c.token for c in content] == [ref.tokenizer.decode([t]) for t in shown]
    for i, (entry, token) in enumerate(zip(content, shown)):
        assert entry.logprob == pytest.approx(float(logp[len(ids) - 1 + i, token]), abs=1e-4)
        assert [t.token for t in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode())
    pieces = []
    for chunk in server.client().chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=6, temperature=0, stream=True, logprobs=True
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            pieces += [c.token for c in chunk.choices[0].logprobs.content]
    assert pieces == [c.token for c in content]


def test_text_completion_logprobs_have_the_legacy_shape(server, ref):
    answer = server.client().completions.create(
        model=NAME, prompt="w20 w21 w22", max_tokens=5, temperature=0, logprobs=2
    )
    lp = answer.choices[0].logprobs
    assert "".join(lp.tokens[:1]) == answer.choices[0].text.split()[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


def test_a_strict_server_refuses_other_model_names(checkpoint):
    from fastapi.testclient import TestClient

    from moe_patch.offload import OffloadOptions
    from moe_patch.serve.app import build_app
    from moe_patch.serve.loader import close_served, open_served
    from moe_patch.serve.names import ServedNames

    served = open_served(
        checkpoint, names=ServedNames((NAME, ALIAS), strict=True), options=OffloadOptions(), dtype="float32"
    )
    try:
        client = TestClient(build_app(served))
        body = {"messages": HELLO, "max_tokens": 2}
        for name in (NAME, ALIAS):
            assert client.post("/v1/chat/completions", json={**body, "model": name}).status_code == 200
        refused = client.post("/v1/chat/completions", json={**body, "model": "gpt-4o"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert "tiny-moe" in refused.json()["error"]["message"]
        assert client.get("/v1/models/gpt-4o").status_code == 404
    finally:
        close_served(served)


# -- refusals before anything loads -----------------------------------------------------------------------------------
def test_serve_without_its_libraries_says_what_to_install(checkpoint, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", str(checkpoint)]) == 1
    assert "pip install '.[serve]'" in capsys.readouterr().err


def test_serve_on_a_busy_port_fails_in_one_line_before_loading(checkpoint, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(checkpoint), "--port", str(busy.getsockname()[1])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-patch serve: error: cannot listen on 127.0.0.1:") and "\n" not in err


def test_serve_refuses_an_empty_api_key(checkpoint, capsys):
    assert main(["serve", str(checkpoint), "--api-key", " "]) == 1
    assert "--api-key is empty" in capsys.readouterr().err


# -- moe-patch chat through a pseudo-terminal -------------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal:
    """A program on a pseudo-terminal, its controlling terminal (so Ctrl-C is a SIGINT): type, wait for output."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(
            argv,
            stdin=child,
            stdout=child,
            stderr=child,
            env=env,
            close_fds=True,
            start_new_session=True,
            preexec_fn=in_terminal_session,
        )
        os.close(child)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 90) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.seen}"
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.seen += ANSI.sub("", os.read(self.fd, 65536).decode(errors="replace"))
                except OSError:  # the program closed the terminal
                    assert re.search(pattern, self.seen), f"no {pattern!r} in:\n{self.seen}"
        self.seen = self.seen[match.end() :]
        return match

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def test_chat_in_a_terminal_applies_the_template_streams_replies_and_prints_statistics(checkpoint, ref):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    term = Terminal(
        [
            str(MOE_PATCH),
            "chat",
            str(checkpoint),
            "--temperature",
            "0",
            "--max-new-tokens",
            "10",
            "--verbose-prompt",
            *offload_flags(),
        ],
        env,
    )
    try:
        term.expect(r"!help for commands.*\n> ")
        conversation: list[dict] = []
        for line in ("w5 w6 w7", "w60 w61"):
            conversation.append({"role": "user", "content": line})
            term.type(line)
            sent = json.loads(term.expect(r"\[prompt: \d+ tokens: (\[[\d, ]*\])\]\n").group(1))
            assert sent == ref.chat_ids(conversation)  # the template, with the whole conversation so far
            reply = term.expect(r"(.*)\n\[\d+ decode tokens at ").group(1).strip()
            expected, _ = ref.answer(conversation, 10)
            assert reply == expected
            conversation.append({"role": "assistant", "content": reply})
            term.expect(r"\n> ")
        term.type("!stats")
        term.expect(r"last reply:\nmoe-patch offload statistics[\s\S]*?hit rate")
        term.expect(r"session: \d+ decode tokens at [\d.]+ tok/s.*of the bandwidth bound\n> ")
        term.type("!set top_p=0")
        term.expect(r"!set top_p: expected a number in \(0, 1\]")
        term.type(f"!set max_new_tokens={CONTEXT}")  # cut to what the context leaves: a long reply
        term.expect(r"\n> ")
        term.type("w70")
        term.expect(r"\[prompt: \d+ tokens: .*\]\n")
        os.write(term.fd, b"\x03")  # Ctrl-C while it generates
        term.expect(r"\(stopped; this turn is left out of the conversation\)\n> ")
        term.type("w71")  # the stopped turn is not in the conversation
        sent = json.loads(term.expect(r"\[prompt: \d+ tokens: (\[[\d, ]*\])\]\n").group(1))
        assert sent == ref.chat_ids([*conversation, {"role": "user", "content": "w71"}])
        term.expect(r"\n> ", timeout=120)
        term.type("!exit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.fd)


# -- moe-patch run: the chat template, sampling, decoded text ---------------------------------------------------------
def test_run_chat_puts_the_prompt_in_the_template(checkpoint, ref, capsys):
    assert (
        main(["run", str(checkpoint), "--prompt", "w5 w6 w7", "--chat", "--max-new-tokens", "8", *offload_flags()]) == 0
    )
    assert capsys.readouterr().out.splitlines()[0] == ref.answer(HELLO, 8)[0]


def test_run_sampling_is_reproducible_with_a_seed(checkpoint, capsys):
    argv = [
        "run",
        str(checkpoint),
        "--prompt",
        "w5 w6",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.2",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "7",
        *offload_flags(),
    ]
    texts = []
    for _ in range(2):
        assert main(argv) == 0
        texts.append(capsys.readouterr().out.splitlines()[0])
    assert texts[0] == texts[1] and len(texts[0].split()) > 0


def test_run_decodes_prompt_ids_when_the_checkpoint_has_a_tokenizer(checkpoint, ref, capsys):
    assert main(["run", str(checkpoint), "--prompt-ids", "20,21,22", "--max-new-tokens", "5", *offload_flags()]) == 0
    new = ref.greedy([20, 21, 22], 5)
    assert capsys.readouterr().out.splitlines()[0] == ref.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--prompt", "w5", "--top-p", "0"], 2, "argument --top-p: expected a number in (0, 1], got 0"),
        (
            ["--prompt", "w5", "--temperature", "-0.5"],
            2,
            "argument --temperature/--temp: expected a number >= 0, got -0.5",
        ),
        (["--prompt", "w5", "--top-k", "0"], 2, "argument --top-k: expected an integer >= 1, got 0"),
        (["--prompt", "w5", "--seed", "x"], 2, "argument -s/--seed: expected an integer in [0, "),
        (["--prompt-ids", "5,6", "--chat"], 1, "--chat puts the prompt text in the chat template"),
        (["--prompt", "w5", "--max-new-tokens", str(CONTEXT)], 1, "--max-new-tokens: the prompt (1 tokens) plus"),
    ],
)
def test_run_refuses_bad_generation_arguments_in_one_line(checkpoint, capsys, extra, code, message):
    try:
        got = main(["run", str(checkpoint), *extra])
    except SystemExit as exc:  # argparse
        got = exc.code
    err = capsys.readouterr().err
    assert got == code and message in err and err.count("\n") == 1
