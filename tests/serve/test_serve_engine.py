"""The server's engine: requests decoded together in one batch get, each, the tokens ``generate()`` gives it alone.

Every family's tiny checkpoint is loaded offloaded (experts paged through a small device cache) on the engine's
thread, as `moe-patch serve` loads it; requests of different prompt lengths and lengths of answer are submitted
together and compared with transformers' ``generate()`` on the same checkpoint loaded resident, one request at a
time (fp32, greedy). Models whose cache cannot be left-padded (gpt_oss: sliding windows) run each request alone
through ``generate()``, with the same result.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moe_patch.offload import OffloadOptions, get_offload_handle, load_model
from moe_patch.serve import kv
from moe_patch.serve.engine import Delta, Engine, Failed, Finished, Job, Overloaded
from moe_patch.serve.prompt_cache import PromptCache, common_prefix
from moe_patch.serve.sampler import effective_config, step_loop_refusal
from tests.helpers.offload import FAMILIES, VOCAB, expert_bytes, load_reference, model_class, save_tiny


class WordsTokenizer:
    """Enough of a tokenizer for the engine: token ``i`` is the word ``wi``."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


class Collect:
    """A request's events, and a way to wait for its end."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    def wait(self, timeout: float = 120) -> Finished:
        assert self.done.wait(timeout), "the request did not end"
        assert isinstance(self.events[-1], Finished), self.events[-1]
        return self.events[-1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


def start_engine(family: str, path, **kw) -> Engine:
    one = expert_bytes(family)
    options = OffloadOptions(expert_cache=2 * one, host_cache=3 * one)
    engine = Engine(
        lambda: load_model(str(path), options=options, dtype=torch.float32, model_class=model_class(family)),
        WordsTokenizer(),
        **kw,
    )
    engine.start()
    return engine


def stop_engine(engine: Engine) -> None:
    engine.close()
    get_offload_handle(engine.model).detach(restore_weights=False)


@pytest.fixture
def engine_of(checkpoints):
    """``engine_of(family, **options)``: an engine on that family's checkpoint, stopped after the test."""
    started = []

    def start(family: str, **kw) -> Engine:
        started.append(start_engine(family, checkpoints[family], **kw))
        return started[-1]

    yield start
    for engine in started:
        stop_engine(engine)


def greedy_config(engine: Engine, new_tokens: int, **settings):
    config = effective_config(engine.model.generation_config, engine.model.generation_config)
    config.do_sample, config.max_new_tokens = False, new_tokens
    for name, value in settings.items():
        setattr(config, name, value)
    return config


def submit(engine: Engine, ids: list[int], config, **kw) -> Collect:
    sink = Collect()
    sink.job = Job(f"r{time.monotonic_ns()}", ids, config, sink, **kw)
    engine.submit(sink.job)
    return sink


def reference_tokens(ref, ids: list[int], new_tokens: int, **settings) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **settings
        )
    return out[0, len(ids) :].tolist()


def random_requests(count: int, seed: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(3, VOCAB, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist(),
            int(torch.randint(4, 48, (1,), generator=g)),
        )
        for _ in range(count)
    ]


# -- batching is exact ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_requests_decoded_together_get_the_tokens_of_generate_alone(family, checkpoints, engine_of):
    ref = load_reference(family, checkpoints[family])
    engine = engine_of(family, max_batch=4, prompt_cache_bytes=0)
    for seed in (0, 1):
        requests = random_requests(6, seed)  # more than the batch: some wait, then join a running batch
        sinks = [submit(engine, ids, greedy_config(engine, n)) for ids, n in requests]
        for (ids, n), sink in zip(requests, sinks):
            assert sink.wait().token_ids == reference_tokens(ref, ids, n)
    records = engine.book.records()
    if family == "gpt_oss":  # sliding-window layers: each request alone through generate()
        assert engine.batchable and {r.path for r in records} == {"generate"}
    else:
        assert engine.batchable is None and {r.path for r in records} == {"batched"}
        assert max(r.mean_batch or 0 for r in records) > 2  # they really were decoded together


def test_a_prompt_that_begins_like_an_earlier_sequence_reuses_its_cache_with_the_same_tokens(checkpoints, engine_of):
    family = "qwen3_moe"
    ref = load_reference(family, checkpoints[family])
    engine = engine_of(family, prompt_cache_bytes=2**20)
    first = list(range(10, 40))
    answer = submit(engine, first, greedy_config(engine, 12)).wait()
    follow_up = first + answer.token_ids + [50, 51, 52]  # the next turn: the history, then more
    second = submit(engine, follow_up, greedy_config(engine, 12)).wait()
    # the first sequence's cache holds its prompt and every generated token but the last (never run)
    assert second.cached_prompt_tokens == len(first) + len(answer.token_ids) - 1
    assert second.token_ids == reference_tokens(ref, follow_up, 12)
    third = submit(engine, first[:20] + [60], greedy_config(engine, 5)).wait()  # a prefix of it, then other
    assert third.cached_prompt_tokens == 20 and third.token_ids == reference_tokens(ref, first[:20] + [60], 5)
    status = engine.status()["prompt_cache"]
    assert status["entries"] >= 1 and 0 < status["bytes"] <= 2**20


def test_sampling_with_a_seed_draws_what_generate_draws_after_set_seed_even_in_a_batch(checkpoints, engine_of):
    from transformers import set_seed

    family = "mixtral"
    ref = load_reference(family, checkpoints[family])
    engine = engine_of(family)
    settings = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1}
    ids = [5, 6, 7, 8]
    set_seed(1234)
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = ref.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=16, pad_token_id=0, eos_token_id=None, **settings
        )[0, 4:].tolist()
    config = greedy_config(engine, 16, eos_token_id=None, **settings)
    alone = submit(engine, ids, config, seed=1234).wait().token_ids
    others = [submit(engine, [9, 10, 11], config) for _ in range(2)]  # unseeded neighbours in the batch
    together = submit(engine, ids, config, seed=1234)
    assert alone == expected and together.wait().token_ids == expected
    for other in others:
        other.wait()


def test_a_generation_setting_the_batch_does_not_carry_out_runs_through_generate(checkpoints, engine_of):
    family = "mixtral"
    ref = load_reference(family, checkpoints[family])
    engine = engine_of(family)
    config = greedy_config(engine, 24, no_repeat_ngram_size=2)
    assert engine.solo_reason(config) == "the generation setting 'no_repeat_ngram_size'"
    batched = submit(engine, [20, 21, 22], greedy_config(engine, 30))
    solo = submit(engine, [5, 6, 7], config)
    assert solo.wait().token_ids == reference_tokens(ref, [5, 6, 7], 24, no_repeat_ngram_size=2)
    assert batched.wait().token_ids == reference_tokens(ref, [20, 21, 22], 30)
    assert [r.path for r in engine.book.records()][-2:] in (["batched", "generate"], ["generate", "batched"])


def test_log_probabilities_are_the_models_own(checkpoints, engine_of):
    family = "mixtral"
    ref = load_reference(family, checkpoints[family])
    engine = engine_of(family)
    ids = [30, 31, 32, 33]
    sink = submit(engine, ids, greedy_config(engine, 6), top_logprobs=3)
    finished = sink.wait()
    entries = [lp for e in sink.events if isinstance(e, Delta) for _, lp in e.logprobs]
    assert [e.token_id for e in entries] == [t for t in finished.token_ids if t != 2]
    sequence = torch.tensor([ids + finished.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(ref(sequence).logits[0].float(), dim=-1)
    for i, entry in enumerate(entries):
        row = logp[len(ids) - 1 + i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == torch.topk(row, 3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy: the most likely token


def test_a_cancelled_request_leaves_the_batch_and_the_others_are_unaffected(checkpoints, engine_of):
    family = "mixtral"
    ref = load_reference(family, checkpoints[family])
    engine = engine_of(family)
    doomed = submit(engine, [40, 41], greedy_config(engine, 200, eos_token_id=None))
    kept = submit(engine, [42, 43, 44], greedy_config(engine, 40))
    while not any(isinstance(e, Delta) for e in doomed.events):
        time.sleep(0.01)
    doomed.job.cancelled.set()  # the client went away
    assert doomed.wait().reason == "cancelled" and len(doomed.events[-1].token_ids) < 200
    assert kept.wait().token_ids == reference_tokens(ref, [42, 43, 44], 40)


def test_a_full_queue_answers_overloaded_and_loses_nothing_queued(checkpoints, engine_of):
    family = "mixtral"
    engine = engine_of(family, max_queue=2)
    release = threading.Event()
    engine.call(lambda: release.wait(30))  # the engine thread is busy: requests stay queued
    time.sleep(0.1)
    queued = [submit(engine, [5, 6], greedy_config(engine, 3)) for _ in range(2)]
    with pytest.raises(Overloaded) as refused:
        submit(engine, [5, 6], greedy_config(engine, 3))
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    release.set()
    assert all(len(sink.wait().token_ids) == 3 for sink in queued)


def test_the_engine_loads_and_runs_the_model_on_its_own_thread(checkpoints):
    """GNU OpenMP stops spin-waiting between parallel regions once the threads of its per-thread pools outnumber the
    cores: a model loaded on one thread and run on another decoded ~40% slower on 2 cores."""
    loaded_on, ran_on = [], []
    path = checkpoints["mixtral"]

    def load():
        loaded_on.append(threading.get_ident())
        model = load_model(str(path), options=OffloadOptions(), dtype=torch.float32)
        model.register_forward_pre_hook(lambda *a: ran_on.append(threading.get_ident()))
        return model

    engine = Engine(load, WordsTokenizer())
    engine.start()
    try:
        submit(engine, [5, 6, 7], greedy_config(engine, 3)).wait()
        assert set(ran_on) == set(loaded_on) == {engine.thread_id} and engine.thread_id != threading.get_ident()
    finally:
        stop_engine(engine)


# -- the pieces ------------------------------------------------------------------------------------------------
def test_step_loop_refusal_names_what_only_generate_does():
    from transformers import GenerationConfig

    assert (
        step_loop_refusal(
            GenerationConfig(
                do_sample=True,
                temperature=0.7,
                top_k=20,
                top_p=0.9,
                min_p=0.05,
                repetition_penalty=1.2,
                max_new_tokens=9,
                eos_token_id=[1, 2],
                sequence_bias={(3,): -1.0},
                num_beams=1,
            )
        )
        is None
    )
    assert step_loop_refusal(GenerationConfig(num_beams=4)) == "num_beams"
    assert step_loop_refusal(GenerationConfig(no_repeat_ngram_size=3)) == "no_repeat_ngram_size"
    assert step_loop_refusal(GenerationConfig(suppress_tokens=[5])) == "suppress_tokens"


def test_effective_config_fills_what_the_request_leaves_as_generate_does():
    from transformers import GenerationConfig

    checkpoint = GenerationConfig(do_sample=True, temperature=0.6, eos_token_id=7)
    out = effective_config(GenerationConfig(temperature=1.3), checkpoint)
    assert (out.temperature, out.do_sample, out.eos_token_id, out.top_k, out.top_p) == (1.3, True, 7, 50, 1.0)


def _kv(batch: int, length: int, fill: float) -> kv.KV:
    t = torch.full((batch, 2, length, 3), fill)
    return [(t, t + 100) for _ in range(2)]


def test_batch_caches_join_and_leave_with_left_padding():
    batch, pads = kv.join([], [], _kv(1, 3, 1.0))
    batch, pads = kv.join(batch, pads, _kv(1, 5, 2.0))  # longer: the batch is padded
    batch, pads = kv.join(batch, pads, _kv(1, 2, 3.0))  # shorter: it is padded
    assert pads == [2, 0, 3] and batch[0][0].shape == (3, 2, 5, 3)
    assert torch.equal(
        kv.attention_mask(pads, 6, "cpu")[:, :5], torch.tensor([[0, 0, 1, 1, 1], [1] * 5, [0, 0, 0, 1, 1]])
    )
    assert torch.equal(kv.row(batch, pads, 2)[1][1], _kv(1, 2, 3.0)[1][1])  # a row comes out as it went in
    kept, kept_pads = kv.keep(batch, pads, [0, 2])  # the longest row leaves: two pad columns go with it
    assert kept_pads == [0, 1] and kept[0][0].shape == (2, 2, 3, 3)
    assert torch.equal(kv.row(kept, kept_pads, 0)[0][0], _kv(1, 3, 1.0)[0][0])


def test_the_prompt_cache_finds_the_longest_common_prefix_within_its_budget():
    cache = PromptCache(budget=kv.nbytes(_kv(1, 10, 0.0)) * 2)
    cache.store([1, 2, 3, 4, 5], _kv(1, 5, 1.0))
    cache.store([1, 2, 9], _kv(1, 3, 2.0))
    hit = cache.lookup([1, 2, 3, 4, 7, 8])
    assert hit.tokens == 4 and hit.kv[0][0].shape[2] == 4 and float(hit.kv[0][0][0, 0, 0, 0]) == 1.0
    assert cache.lookup([1, 2, 3, 4, 5]).tokens == 4  # the last prompt token is always run
    assert cache.lookup([8, 9]) is None
    cache.store([1, 2, 3, 4, 5, 6, 7], _kv(1, 7, 3.0))  # supersedes [1..5]
    assert cache.to_dict()["entries"] == 2
    cache.store(list(range(100, 130)), _kv(1, 30, 4.0))  # over the budget alone: not kept
    cache.store(list(range(100, 115)), _kv(1, 15, 4.0))  # fits by dropping the least recently used
    assert cache.to_dict()["bytes"] <= cache.budget and cache.lookup([1, 2, 9, 9]) is None
    assert common_prefix([1, 2, 3], [1, 2]) == 2
