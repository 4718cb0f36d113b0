"""A word-level tokenizer built locally (nothing downloaded), with a chat template in tokenizer_config.json.

Every id of the tiny models' vocabulary is one word (``w0``, ``w1``, ... and the template's markers), so
decoded text maps back to token ids one for one and comparing texts compares tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

# ids 0, 1, 2 (Mixtral's default pad / bos / eos). Only <eos> is a special token: decoding drops special
# tokens, and generation stops at <eos>, so the text and the token count together give every token id.
SPECIAL = ["<pad>", "<bos>", "<eos>"]
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def words(vocab_size: int) -> list[str]:
    """The vocabulary in id order."""
    return SPECIAL + MARKERS + [f"w{i}" for i in range(vocab_size - len(SPECIAL) - len(MARKERS) - 1)] + ["<unk>"]


def save_word_tokenizer(directory: Path, vocab_size: int, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write tokenizer.json and tokenizer_config.json (with ``chat_template``) into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words(vocab_size))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    (Path(directory) / "chat_template.jinja").unlink(missing_ok=True)
    if chat_template is not None:
        config["chat_template"] = chat_template  # where most Hub checkpoints keep it
    config_path.write_text(json.dumps(config, indent=2))
    return Path(directory)
