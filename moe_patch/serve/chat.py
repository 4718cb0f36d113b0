"""``moe-patch chat``: a terminal chat with the model in this process.

Why not transformers' ``transformers chat``: it only talks to a server, through huggingface_hub's client
(no API key), and its commands are one closed ``if`` chain in ``Chat._inner_run`` with no place for a
statistics command. Its command names are kept (``!help``, ``!clear``, ``!set``, ``!exit``) and
``!stats`` is added; ``transformers chat NAME http://127.0.0.1:8000`` also works against ``moe-patch serve``.

Each reply is generated on a worker thread and streamed with transformers' ``TextIteratorStreamer``;
Ctrl-C stops it at the next token through a stopping criterion, so the engine is never interrupted in
the middle of a forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from typing import Any, TextIO

from ..offload import get_offload_handle
from ..sizes import format_bytes
from ..text import byte_limit, text_problem
from ..threads import release_idle_team
from . import limits
from .context import ContextLengthError, context_length, new_token_budget
from .sampling import Sampling, generation_config
from .stats import StatsBook, summary
from .tokenizer import chat_input_ids

HELP = """commands:
  !help                 this list
  !stats                offload statistics of the last reply and of the session
  !clear                start a new conversation (the system prompt stays)
  !set NAME=VALUE ...   change temperature, top_p, top_k, repetition_penalty or max_new_tokens
  !exit                 leave (Ctrl-D too); Ctrl-C stops a reply"""

SETTABLE = {
    "temperature": limits.TEMPERATURE,
    "top_p": limits.TOP_P,
    "top_k": limits.TOP_K,
    "repetition_penalty": limits.REPETITION_PENALTY,
    "max_new_tokens": limits.MAX_NEW_TOKENS,
}


def _stop_when(event: threading.Event):
    import torch
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Stop()


class ChatSession:
    """One conversation with ``model``; ``args`` are `moe-patch chat`'s (sampling, --system, ...)."""

    def __init__(self, model: Any, tokenizer: Any, args: argparse.Namespace, out: TextIO | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, args.path
        self.system = args.system
        self.sampling = Sampling.from_mapping(args)
        self.max_new_tokens = args.max_new_tokens
        self.verbose_prompt = args.verbose_prompt
        self.context = context_length(model.config)
        self.book = StatsBook(get_offload_handle(model))
        self.out = out or sys.stdout
        self.messages = self._new_conversation()
        self.sampling.seeded()  # once: the whole session is reproducible, not each turn the same draw

    def _new_conversation(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def loop(self, read=input) -> None:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # pragma: no cover - not on every platform
            pass
        self.say(f"moe-patch chat with {self.name}: type a message, !help for commands, !exit or Ctrl-D to leave")
        while True:
            try:
                line = read("> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.say()
                return
            except UnicodeDecodeError as exc:  # a stdin that decodes strictly: the line is lost, the session is not
                self.say(
                    f"your message is not valid UTF-8 at byte {exc.start} of what was read ({exc.reason}); "
                    "nothing was sent"
                )
                continue
            if not line:
                continue
            refused = self.refusal(line)
            if refused:
                self.say(f"your message {refused}; nothing was sent")
                continue
            if line.startswith("!"):
                if not self.command(line):
                    return
            else:
                self.reply(line)

    def refusal(self, line: str) -> str | None:
        """Why ``line`` is not sent to the model (text that is not Unicode, or far more than the context holds:
        refused before tokenizing), or None."""
        problem = text_problem(line, from_bytes=True)  # stdin is read with surrogateescape (cli.chat)
        if problem:
            return f"is {problem}"
        size, limit = len(line.encode("utf-8")), byte_limit(self.context)
        if size > limit:
            context = f"the model's context of {self.context} tokens" if self.context else "a prompt"
            return (
                f"is {format_bytes(size)} ({size} bytes); {context} holds far less, so it was not tokenized "
                f"(the limit is {format_bytes(limit)})"
            )
        return None

    # -- commands --------------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a ``!command``; False when the session should end."""
        name, _, rest = line.partition(" ")
        if name == "!exit":
            return False
        if name == "!help":
            self.say(HELP)
        elif name == "!clear":
            self.messages = self._new_conversation()
            self.say("(new conversation)")
        elif name == "!stats":
            self.print_stats()
        elif name == "!set":
            self.set(rest.split())
        else:
            self.say(f"unknown command {name}; {HELP}")
        return True

    def print_stats(self) -> None:
        if self.book.last is None:
            self.say("no reply yet: the statistics count from the first one")
            return
        self.say(f"last reply:\n{self.book.last}")
        self.say(f"session: {summary(self.book.cumulative())}")

    def set(self, assignments: list[str]) -> None:
        if not assignments:
            self.say(f"usage: !set NAME=VALUE ... with NAME one of {', '.join(SETTABLE)}")
        for item in assignments:
            key, eq, value = item.partition("=")
            if not eq or key not in SETTABLE:
                self.say(f"!set {item}: expected NAME=VALUE with NAME one of {', '.join(SETTABLE)}")
                return
            try:
                parsed = SETTABLE[key].argparse_type()(value)
            except argparse.ArgumentTypeError as exc:
                self.say(f"!set {key}: {exc}")
                return
            if key == "max_new_tokens":
                self.max_new_tokens = parsed
            else:
                self.sampling = dataclasses.replace(self.sampling, **{key: parsed})
            self.say(f"{key} = {parsed}")

    # -- one turn ----------------------------------------------------------------------------------------------
    def reply(self, text: str) -> str | None:
        """Generate and stream the answer to ``text``; the turn joins the conversation unless it was stopped."""
        import torch
        from jinja2 import TemplateError
        from transformers import TextIteratorStreamer

        messages = [*self.messages, {"role": "user", "content": text}]
        try:
            ids = chat_input_ids(self.tokenizer, messages)
        except TemplateError as exc:  # e.g. a template without a system role
            self.say(f"the chat template refuses this conversation: {exc}")
            return None
        try:
            new_tokens = new_token_budget(len(ids), self.context, self.max_new_tokens, explicit=False)
        except ContextLengthError as exc:
            self.say(f"{exc} (!clear starts a new conversation)")
            return None
        input_ids = torch.tensor([ids], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failure: list[BaseException] = []
        ticket = self.book.enqueue(prompt_tokens=len(ids))

        def generate() -> None:
            try:
                with torch.no_grad():
                    self.book.measure(
                        ticket,
                        self.model.generate,
                        input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=generation_config(self.model, self.sampling, new_tokens),
                        streamer=streamer,
                        stopping_criteria=[_stop_when(stop)],
                    )
            except BaseException as exc:  # shown on the main thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, name="moe-patch-chat", daemon=True)
        pieces: list[str] = []
        release_idle_team()  # the worker's OpenMP team is then the only one (moe_patch.threads)
        worker.start()
        try:  # from here on Ctrl-C stops the reply, not the session
            if self.verbose_prompt:
                self.say(f"[prompt: {len(ids)} tokens: {ids}]")
            for piece in streamer:
                pieces.append(piece)
                self.say(piece, end="")
        except KeyboardInterrupt:
            stop.set()
            for _ in streamer:  # let the generation reach its next token and end
                pass
        worker.join()
        self.say()
        if failure:
            raise failure[0]
        if stop.is_set():
            self.say("(stopped; this turn is left out of the conversation)")
            return None
        answer = "".join(pieces)
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.say(f"[{summary(self.book.records()[-1].offload)}]")
        return answer
