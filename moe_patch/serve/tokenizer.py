"""The checkpoint's tokenizer and chat template, for `run`, `chat` and `serve` alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, InvalidArgumentError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tekken.json",
)


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether a local checkpoint folder ships a tokenizer (a Hub repo id: unknown until loaded, so True)."""
    local = Path(path)
    return not local.is_dir() or any((local / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, *, instead: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``path`` (a folder or a Hub repo id); ``instead`` ends the message when there is none."""
    if not has_tokenizer_files(path):
        # transformers would build an empty tokenizer here (no error, no tokens)
        raise CheckpointError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); {instead}.")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=Path(path).is_dir())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: no usable tokenizer ({exc}); {instead}.") from exc


def require_chat_template(tokenizer: Any, path: str | Path, what: str) -> None:
    """Refuse, with the way out, a tokenizer that has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(
            f"{what}: {path} has no chat template (no chat_template in tokenizer_config.json or "
            "chat_template.jinja); give the prompt as plain text instead."
        )


def chat_input_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ready for the assistant's turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])
