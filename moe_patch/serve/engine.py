"""The one thread that runs the model: it loads it, then decodes every request, several in one batch.

Requests wait in a bounded FIFO queue (full: 503). Between two decode passes the engine admits waiting requests
while the batch has room (``--parallel``): each one's prompt is run alone (its prefill), reusing the longest cached
prefix of an earlier sequence (``prompt_cache.py``); its first token is chosen, and unless that already ends it, its
cache joins the batch's (``kv.py``). Then one forward pass decodes the next token of every request in the batch:
each row's attention mask, positions and cache are those of the request alone, left-padded, so each request's greedy
tokens are those of ``generate()`` on it alone (the tests compare them), and each picks its token with its own
settings (``sampler.py``). A request leaves the batch at its end-of-sequence token, its stop string, its length or
when its client goes away; its cache is kept for prompts that begin like it.

Where batching cannot be exact, a request runs through transformers' ``generate()`` alone instead, when the batch is
empty (the queue waits meanwhile): for models whose cache is not made of plain full-attention layers (sliding
windows, linear attention, encoder-decoders: ``kv.plain_layers``), and for requests with a generation setting the
step loop does not carry out (``sampler.step_loop_refusal``: beam search, n-gram bans, ...).

Everything that touches the model runs on this thread, the model's load included: GNU OpenMP keeps a worker pool per
thread that has run a parallel region, and once those pools' threads outnumber the cores it stops spin-waiting
between regions, which made every decode step of a model loaded on one thread and run on another ~40% slower on 2
cores (``bench/serve.py``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..threads import release_idle_team
from . import kv
from .errors import RequestError
from .output_text import OutputText
from .prompt_cache import PromptCache
from .sampler import TokenChooser, TokenLogprob, eos_ids, step_loop_refusal
from .stats import EngineMeter, RequestRecord, ServerBook, Totals

logger = logging.getLogger("moe_patch.serve")


# -- what a request gets back (on the engine thread, through the request's `emit`) ----------------------------------
@dataclass
class Delta:
    """Text that may be sent now, and the log-probability entries (text offset, entry) of the tokens it completes."""

    text: str
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)


@dataclass
class Finished:
    reason: str  # "stop" (end-of-sequence token or stop string), "length", or "cancelled" (client gone)
    text: str  # the whole answer, cut before the stop string
    token_ids: list[int]  # every generated token
    prompt_tokens: int
    cached_prompt_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """One request as the engine runs it. ``config`` is the effective generation config (``sampler.effective_config``)
    with ``max_new_tokens`` set; ``emit`` is called on the engine thread with each :class:`Delta`, then one
    :class:`Finished` or :class:`Failed`."""

    request_id: str
    prompt_ids: list[int]
    config: Any
    emit: Callable[[Any], None]
    stops: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None  # None: no log-probabilities; 0: the chosen token's only
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    solo: str | None = None  # why generate() runs it alone (set by `Engine.submit`), None for the batch


class Overloaded(RequestError):
    """The queue is full: 503, try again later."""


class _Sequence:
    """A request being generated: its tokens, text and accounting."""

    def __init__(self, job: Job, tokenizer: Any, chooser: TokenChooser | None, cached: int = 0):
        self.job, self.chooser, self.cached = job, chooser, cached
        self.ids = list(job.prompt_ids)
        self.out = OutputText(tokenizer, job.stops)
        self.eos = eos_ids(job.config)
        self.generated = 0
        self.reason: str | None = None
        self.started, self.started_at = time.monotonic(), time.time()
        self.first_token_at: float | None = None
        self.offload = Totals()
        self.passes = self.batch_sum = 0

    def take(self, token: int, logprob: TokenLogprob | None = None) -> str | None:
        """Add the next token; why the generation ends with it, or None."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.ids.append(token)
        self.generated += 1
        release = self.out.add(token, logprob)
        if release.text or release.logprobs:
            _send(self.job, Delta(release.text, release.logprobs))
        if token in self.eos or self.out.stopped:
            self.reason = "stop"
        elif self.generated >= self.job.config.max_new_tokens:
            self.reason = "length"
        return self.reason


def _send(job: Job, event: Any) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the request's event loop is gone (server stopping): nobody reads this any more
        job.cancelled.set()


class Engine:
    """Runs ``load()`` (which returns the model) and then every generation on one thread of its own."""

    def __init__(
        self,
        load: Callable[[], Any],
        tokenizer: Any,
        *,
        max_batch: int = 4,
        max_queue: int = 64,
        prompt_cache_bytes: int = 0,
        book: ServerBook | None = None,
    ):
        self._load, self.tokenizer = load, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.book = book or ServerBook()
        self.model: Any = None
        self.batchable: str | None = None  # why the model cannot be batched (None: it can)
        self._jobs: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._rows: list[_Sequence] = []
        self._cache: Any = None  # the batch's DynamicCache
        self._pads: list[int] = []
        self._report_due = False
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._main, name="moe-patch-engine", daemon=True)

    # -- from other threads ----------------------------------------------------------------------------------------
    def start(self) -> Any:
        """Start the thread and wait for the model (re-raising what its load raised)."""
        release_idle_team()  # the engine thread's OpenMP team is then the only one (moe_patch.threads)
        self._thread.start()
        return self._ready.result()

    def solo_reason(self, config: Any) -> str | None:
        """Why a request with ``config`` would run through ``generate()`` alone, None if it joins the batch."""
        if self.batchable is not None:
            return self.batchable
        refused = step_loop_refusal(config)
        return f"the generation setting {refused!r}" if refused else None

    def submit(self, job: Job) -> None:
        """Queue ``job`` (503 :class:`Overloaded` when the queue is full)."""
        job.solo = self.solo_reason(job.config)
        with self._cond:
            if self._closing:
                raise Overloaded(
                    "the server is shutting down", status=503, code="server_shutting_down", type="server_error"
                )
            if len(self._jobs) >= self.max_queue:
                raise Overloaded(
                    f"the server is busy: {len(self._jobs)} requests are waiting (--max-queue); try again in a moment",
                    status=503,
                    code="server_overloaded",
                    type="server_error",
                    headers={"Retry-After": "1"},
                )
            self._jobs.append(job)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two decode passes."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Stop after the current pass: waiting and running requests end with :class:`Failed`."""
        with self._cond:
            self._closing = True
            for s in list(self._rows):  # a generate() running alone stops at its next token
                s.job.cancelled.set()
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def status(self) -> dict[str, Any]:
        """Queue and batch, for ``GET /stats``."""
        with self._cond:
            waiting = len(self._jobs)
        rows = list(self._rows)
        return {
            "scheduling": f"up to {self.max_batch} requests decoded together in one batch"
            + (f"; every request alone through generate() ({self.batchable})" if self.batchable else ""),
            "max_batch": self.max_batch,
            "waiting": waiting,
            "running": [s.job.request_id for s in rows],
            "prompt_cache": self.prompt_cache.to_dict(),
        }

    def engine_report(self) -> dict[str, Any] | None:
        """The offload engine's own report since the server started (``OffloadStats.to_dict``). On the engine thread
        (``call`` it from others), where the counters do not move while it is read."""
        self._report_due = False
        report = self.handle.stats.to_dict() if self.handle is not None else None
        self.book.set_engine_report(report)
        return report

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    # -- on the engine thread ----------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.model = self._load()
            self._setup()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._ready.set_exception(exc)
            return
        self._ready.set_result(self.model)
        with torch.no_grad():
            while True:
                with self._cond:
                    while not (self._jobs or self._calls or self._rows or self._closing):
                        self._cond.wait()
                    calls, self._calls = list(self._calls), deque()
                    closing = self._closing
                for fn, future in calls:
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - the caller's
                        future.set_exception(exc)
                if closing:
                    self._shut_down()
                    return
                self._admit()
                if self._rows:
                    self._step()
                elif self._report_due:  # idle: the engine's own report, read here where its counters do not move
                    self.engine_report()

    def _setup(self) -> None:
        from ..offload import get_offload_handle

        model = self.model
        self.device = model.device
        self.handle = get_offload_handle(model)
        self.meter = EngineMeter(self.handle)
        params = inspect.signature(model.forward).parameters
        # transformers 5.25 renamed `past_key_values` to `cache` (the old name is deprecated)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        if getattr(model.config, "is_encoder_decoder", False):
            self.batchable = "an encoder-decoder model"
        elif "position_ids" not in params:
            self.batchable = "its forward takes no position_ids"
        elif not kv.plain_layers(kv.new_cache(model.config)):
            self.batchable = "its cache is not plain full attention (sliding windows or linear attention)"

    def _admit(self) -> None:
        while len(self._rows) < self.max_batch:
            with self._cond:
                if not self._jobs or (self._jobs[0].solo and self._rows):
                    return  # a request for generate() waits for the batch to empty, and the queue behind it
                job = self._jobs.popleft()
            if job.cancelled.is_set():
                continue
            try:
                if job.solo:
                    self._solo(job)
                else:
                    self._prefill(job)
            except Exception as exc:  # noqa: BLE001 - this request fails, the server goes on
                logger.error("request %s failed", job.request_id, exc_info=exc)
                _send(job, Failed(f"{type(exc).__name__}: {exc}"))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_kw: cache,
            "use_cache": True,
        }
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _account(self, rows: list[_Sequence]) -> None:
        delta = self.meter.delta()
        self.book.add_pass(delta)
        for s in rows:
            s.offload.plus(delta)

    def _prefill(self, job: Job) -> None:
        hit = self.prompt_cache.lookup(job.prompt_ids) if self.prompt_cache.budget else None
        cached = hit.tokens if hit else 0
        chooser = TokenChooser(job.config, self.device, job.seed, job.top_logprobs)
        seq = _Sequence(job, self.tokenizer, chooser, cached)
        ids = job.prompt_ids
        cache = kv.new_cache(self.model.config, hit.kv if hit else None)
        logits = self._forward(
            torch.tensor([ids[cached:]], device=self.device),
            torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            torch.arange(cached, len(ids), device=self.device)[None],
            cache,
        )
        self._account([seq])
        if any(k.shape[2] != len(ids) for k, _ in kv.tensors(cache)):  # a layer the model did not fill as expected
            self.batchable = "its cache did not hold every prompt token in every layer"
            raise RuntimeError(f"the model's cache cannot be batched ({self.batchable}); the next requests run alone")
        seq.take(*chooser.choose(ids, logits[0]))
        row = kv.tensors(cache)
        if seq.reason is not None:
            self._finish(seq, row)
            return
        batch, self._pads = kv.join(kv.tensors(self._cache) if self._rows else [], self._pads, row)
        self._cache = kv.new_cache(self.model.config, batch)
        self._rows.append(seq)

    def _step(self) -> None:
        """One decode pass of the batch; if it fails, its requests fail and the server goes on."""
        try:
            self._decode()
        except Exception as exc:  # noqa: BLE001
            logger.error("decoding a batch of %d failed", len(self._rows), exc_info=exc)
            for s in self._rows:
                _send(s.job, Failed(f"{type(exc).__name__}: {exc}"))
            self._rows, self._cache, self._pads = [], None, []

    def _decode(self) -> None:
        gone = [r for r, s in enumerate(self._rows) if s.job.cancelled.is_set()]
        for r in gone:
            self._rows[r].reason = "cancelled"
        if gone:
            self._leave(gone)
            if not self._rows:
                return
        rows, pads = self._rows, self._pads
        length = kv.tensors(self._cache)[0][0].shape[2]
        logits = self._forward(
            torch.tensor([[s.ids[-1]] for s in rows], device=self.device),
            kv.attention_mask(pads, length + 1, self.device),
            torch.tensor([[length - p] for p in pads], device=self.device),
            self._cache,
        )
        self._account(rows)
        plain = [r for r, s in enumerate(rows) if s.chooser.plain_greedy]
        argmax = dict(zip(plain, logits[plain].argmax(dim=-1).tolist())) if plain else {}
        ended = []
        for r, s in enumerate(rows):
            s.passes += 1
            s.batch_sum += len(rows)
            choice = (argmax[r], None) if r in argmax else s.chooser.choose(s.ids, logits[r])
            if s.take(*choice) is not None:
                ended.append(r)
        if ended:
            self._leave(ended)

    def _leave(self, rows: list[int]) -> None:
        """Finish ``rows`` of the batch (their ``reason`` set) and drop them from it."""
        batch = kv.tensors(self._cache)
        for r in rows:
            self._finish(self._rows[r], kv.row(batch, self._pads, r) if self.prompt_cache.budget else None)
        ended = set(rows)
        keep = [r for r in range(len(self._rows)) if r not in ended]
        batch, self._pads = kv.keep(batch, self._pads, keep)
        self._rows = [self._rows[r] for r in keep]
        self._cache = kv.new_cache(self.model.config, batch) if keep else None

    def _finish(self, seq: _Sequence, row_kv: kv.KV | None) -> None:
        if row_kv is not None and self.prompt_cache.budget:
            self.prompt_cache.store(seq.ids[: row_kv[0][0].shape[2]], row_kv)
        release = seq.out.finish()
        if release.text or release.logprobs:
            _send(seq.job, Delta(release.text, release.logprobs))
        job = seq.job
        _send(
            job,
            Finished(
                seq.reason or "length",
                seq.out.final_text,
                seq.ids[len(job.prompt_ids) :],
                len(job.prompt_ids),
                seq.cached,
            ),
        )
        now = time.monotonic()
        self.book.finished(
            RequestRecord(
                request_id=job.request_id,
                started_at=seq.started_at,
                finished_at=time.time(),
                queued_s=seq.started - job.submitted,
                wall_s=now - seq.started,
                time_to_first_token_s=None if seq.first_token_at is None else seq.first_token_at - job.submitted,
                prompt_tokens=len(job.prompt_ids),
                cached_prompt_tokens=seq.cached,
                completion_tokens=seq.generated,
                finish_reason=seq.reason or "length",
                path="generate" if job.solo else "batched",
                mean_batch=seq.batch_sum / seq.passes if seq.passes else None,
                offload={**seq.offload.figures(), "generations": 1},
            )
        )
        self._report_due = True

    def _solo(self, job: Job) -> None:
        """``job`` through transformers' ``generate()``, alone (the batch is empty)."""
        from transformers import StoppingCriteria, StoppingCriteriaList, set_seed
        from transformers.generation import BaseStreamer

        seq = _Sequence(job, self.tokenizer, None)
        self._rows = [seq]  # for status() and close(); never decoded by the batch (_admit returns after it)

        class Tokens(BaseStreamer):
            def __init__(self):
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() puts the prompt first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    if seq.reason is None:
                        seq.take(int(token))

            def end(self) -> None:
                pass

        class Until(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                done = seq.reason is not None or job.cancelled.is_set()
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        config = copy.deepcopy(job.config)
        config.stop_strings = None  # matched on the text (output_text.py)
        if config.pad_token_id is None:  # generate() warns on every call otherwise, then does this
            eos = config.eos_token_id
            config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        if job.seed is not None:
            set_seed(job.seed)
        ids = torch.tensor([job.prompt_ids], device=self.device)
        try:
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                streamer=Tokens(),
                stopping_criteria=StoppingCriteriaList([Until()]),
            )
        finally:
            self._rows = []
        self._account([seq])
        if seq.reason is None:
            seq.reason = "cancelled" if job.cancelled.is_set() else "length"
        self._finish(seq, None)

    def _shut_down(self) -> None:
        with self._cond:
            waiting, self._jobs = list(self._jobs), deque()
        for s in self._rows:
            _send(s.job, Failed("the server is shutting down"))
        for job in waiting:
            _send(job, Failed("the server is shutting down"))
        self._rows, self._cache, self._pads = [], None, []
