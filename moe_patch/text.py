"""Untrusted text: prompts on the command line and on chat's stdin, strings in server requests.

One policy everywhere: text that is not valid Unicode is refused with one line saying where it breaks, never
repaired. Replacing bad bytes with U+FFFD would send the model a prompt nobody wrote and answer it as if nothing
happened; refusing costs the user one retyped line.

- Command-line arguments and stdin reach Python decoded with ``surrogateescape`` (each byte that is not UTF-8
  becomes one of U+DC80..U+DCFF), so the original bytes can be recovered and the first bad one named by its byte
  offset (``from_bytes=True``).
- A string from JSON can hold a lone surrogate (``"\\ud800"`` is valid JSON), which no tokenizer can encode: it is
  named by its character offset.

A prompt is also bounded in bytes before it is tokenized (:func:`byte_limit`): tokenizing tens of megabytes takes
minutes and gigabytes only to learn that the text does not fit the model's context.
"""

from __future__ import annotations

#: Bytes of request per token of context. A token is a few bytes of text (about 4 in English, up to ~9 for JSON-escaped
#: CJK); 32 leaves room for long tokens, escapes and a conversation's JSON around the text.
BYTES_PER_TOKEN = 32
#: The smallest limit, whatever the context: small models still take any ordinary request.
MIN_BYTE_LIMIT = 2**20
#: The limit for a model that states no context length.
NO_CONTEXT_BYTE_LIMIT = 32 * 2**20


def text_problem(text: str, *, from_bytes: bool = False) -> str | None:
    """None if ``text`` is valid Unicode (encodes as UTF-8); otherwise what is wrong and where, e.g.
    ``not valid UTF-8 at byte 3 (0xff: invalid start byte)`` for bytes decoded with ``surrogateescape``
    (``from_bytes``), ``not valid text: a lone surrogate U+D800 at character 5`` for anything else."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        first = exc.start
    if from_bytes:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:  # a surrogate outside the escaped-byte range: not from bytes at all
            first = exc.start
        else:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                shown = " ".join(f"0x{b:02x}" for b in raw[exc.start : exc.end])
                return f"not valid UTF-8 at byte {exc.start} ({shown}: {exc.reason})"
    return f"not valid text: a lone surrogate U+{ord(text[first]):04X} at character {first}"


def byte_limit(context_tokens: int | None) -> int:
    """The most bytes of prompt (or request) worth tokenizing for a model with this context length."""
    if context_tokens is None:
        return NO_CONTEXT_BYTE_LIMIT
    return max(MIN_BYTE_LIMIT, BYTES_PER_TOKEN * context_tokens)
