"""What a generation's text shows: cut before the first stop string, and, while it streams, never a piece of text that
a later token could turn into the start of one (OpenAI's API and llama-server leave stop strings out)."""

from __future__ import annotations

import pytest

from moe_patch.serve.output_text import OutputText, first_stop, held_back


class BytesTokenizer:
    """Each token is some bytes; decoding joins them and replaces an unfinished character with U+FFFD, as byte-level
    BPE tokenizers do."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def run(pieces: list[bytes], stops: list[str]) -> tuple[list[str], OutputText]:
    out = OutputText(BytesTokenizer(pieces), stops)
    sent = []
    for i in range(len(pieces)):
        sent.append(out.add(i).text)
        if out.stopped:
            break
    sent.append(out.finish().text)
    return sent, out


@pytest.mark.parametrize(
    "pieces, stops, text",
    [
        # a stop string inside one token, across two tokens, across many, and starting mid-token
        ([b"Hello", b" wor", b"ld", b"END", b"more"], ["END"], "Hello world"),
        ([b"Hello", b" wo", b"rld"], ["o wo"], "Hell"),
        ([b"a", b"b", b"c", b"d", b"e", b"f"], ["cde"], "ab"),
        ([b"x</s", b"top> y"], ["</stop>"], "x"),
        # the earliest of several stop strings wins, whatever their order
        ([b"one two three"], ["three", "two"], "one "),
        # a stop string that begins but never completes is released at the end
        ([b"ab", b"c", b"</st", b"a"], ["</stop>"], "abc</sta"),
    ],
)
def test_text_ends_before_the_first_stop_string(pieces, stops, text):
    sent, out = run(pieces, stops)
    assert out.final_text == text and "".join(sent) == text


def test_text_that_could_begin_a_stop_string_is_held_back_until_it_cannot():
    out = OutputText(BytesTokenizer([b"ab", b"</", b"sto", b"x", b"</stop>"]), ["</stop>"])
    assert out.add(0).text == "ab"
    assert out.add(1).text == ""  # "</" may begin "</stop>"
    assert out.add(2).text == ""
    assert out.add(3).text == "</stox"  # it did not
    assert out.add(4).text == "" and out.stopped


def test_an_unfinished_character_is_not_sent_until_its_bytes_arrive():
    euro = "€".encode()  # three bytes
    out = OutputText(BytesTokenizer([b"1", euro[:1], euro[1:2], euro[2:]]))
    assert [out.add(i).text for i in range(4)] == ["1", "", "", "€"]


def test_stop_strings_of_any_length_and_count():
    stops = ["z" * 64, "qq", "stop here", "\u0661\u0662"]
    pieces = [b"a" * 10, "\u0661".encode(), b"b", "\u0661".encode(), "\u0662".encode(), b"tail"]
    sent, out = run(pieces, stops)
    assert out.final_text == "a" * 10 + "\u0661b" and "".join(sent) == out.final_text


def test_log_probability_entries_go_with_the_text_they_made():
    out = OutputText(BytesTokenizer([b"ab", b"</s", b"top>", b"cd"]), ["</stop>"])
    first = out.add(0, logprob="lp0")
    assert first.text == "ab" and first.logprobs == [(0, "lp0")]
    assert out.add(1, logprob="lp1").logprobs == []  # its text is held back
    last = out.add(2, logprob="lp2")
    assert out.stopped and last.logprobs == []  # the stop string's tokens are not part of the answer


def test_helpers():
    assert held_back("abc</st", 0, ["</stop>", "c<"]) == 4
    assert held_back("abc</st", 3, ["</stop>"]) == 4
    assert held_back("abc</st", 4, ["</stop>"]) == 0  # never into text already sent
    assert first_stop("a stop b stop", 3, ["stop"]) == 9


# -- a chat answer with the tokenizer's response template -------------------------------------------------------------
TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"content": "text"},
    },
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.helpers.offload import VOCAB
    from tests.helpers.tokenizer import save_word_tokenizer

    tok = AutoTokenizer.from_pretrained(save_word_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB))
    tok.response_template = TEMPLATE  # what a tokenizer_config.json's "response_template" gives
    return tok


@pytest.mark.parametrize(
    "text, message",
    [
        (
            'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
            {"content": "Let me look.", "tool_calls": [("get_weather", {"city": "Paris"})]},
        ),
        ("<think>hmm</think>The answer is 4.", {"content": "The answer is 4.", "reasoning_content": "hmm"}),
    ],
)
def test_a_response_template_splits_content_reasoning_and_tool_calls(tokenizer, text, message):
    import json

    from moe_patch.serve.engine import Finished
    from moe_patch.serve.handlers import Served, parse_reply
    from moe_patch.serve.tokenizer import chat_input_ids

    served = Served(engine=None, tokenizer=tokenizer, names=None, context=256, generation_config=None)
    prompt = chat_input_ids(tokenizer, [{"role": "user", "content": "w5"}])
    got = parse_reply(served, Finished("stop", text, [], len(prompt), 0), prompt, tools=None)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got.pop("tool_calls", [])]
    assert calls == message.pop("tool_calls", []) and got == message
