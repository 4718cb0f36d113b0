"""Router init from data: the router's real input on user-supplied calibration tokens.

The dense model runs on the user's text (tokenised with the tokenizer saved in SRC) or on a file of
token ids; a forward pre-hook on each MoE layer's MLP records exactly what the router will see
(post-norm hidden states in pre-norm models, the residual stream in OLMo2's post-norm layers).
Nothing is downloaded. Router rows then come from :mod:`converters.recipes` (k-means or principal
directions). This loads the dense model in fp32, so it needs that much RAM once.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from moe_patch.errors import MoEConfigError

from .recipes import principal_directions, scale_router_rows, spherical_kmeans

logger = logging.getLogger(__name__)

_IDS_RE = re.compile(r"^[\s\d,\[\]]*$")


def load_calibration_ids(path: str | Path, src: Path, *, vocab_size: int, fmt: str = "auto") -> torch.Tensor:
    """Token ids [T] from ``path``: a text file (needs a tokenizer in ``src``) or a file of integer ids."""
    path = Path(path)
    if not path.is_file():
        raise MoEConfigError(f"--calibration {path}: file not found.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise MoEConfigError(f"--calibration {path}: no tokens (the file is empty).")
    if fmt not in ("auto", "text", "ids"):
        raise MoEConfigError(f"calibration format {fmt!r}: expected auto, text or ids.")
    # A file made only of integers (whitespace/comma separated or a JSON list) is token ids; anything else is text.
    is_ids = fmt == "ids" or (fmt == "auto" and _IDS_RE.match(text) is not None)
    if is_ids:
        try:
            ids = (
                json.loads(text)
                if text.lstrip().startswith("[")
                else [int(t) for t in re.split(r"[\s,]+", text.strip())]
            )
            ids = torch.tensor([int(i) for i in _flatten(ids)], dtype=torch.long)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise MoEConfigError(f"--calibration {path}: not a list of integer token ids ({exc}).") from None
    else:
        ids = _tokenize(text, src, path)
    if ids.numel() == 0:
        raise MoEConfigError(f"--calibration {path}: no tokens.")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise MoEConfigError(
            f"--calibration {path}: token ids must lie in [0, {vocab_size}) (config.json vocab_size); "
            f"got [{int(ids.min())}, {int(ids.max())}]."
        )
    return ids


def _flatten(x):
    if isinstance(x, list):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


def _tokenize(text: str, src: Path, path: Path) -> torch.Tensor:
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise MoEConfigError(
            f"--calibration {path} is text but {src} has no tokenizer files; save the tokenizer next to the "
            "model or pass a file of token ids (whitespace- or comma-separated integers, or a JSON list)."
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except Exception as exc:
        raise MoEConfigError(f"{src}: cannot load its tokenizer ({type(exc).__name__}: {exc}).") from None
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def collect_router_inputs(
    src: Path, ids: torch.Tensor, layers: list[int], *, max_tokens: int = 4096, chunk: int = 512
) -> dict[int, torch.Tensor]:
    """Run the dense model on ``ids`` and return each MoE layer's MLP input, [T, hidden] in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=False).eval()
    decoder_layers = model.model.layers
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [
        decoder_layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float().clone())
        )
        for i in layers
    ]
    try:
        ids = ids[:max_tokens]
        for start in range(0, ids.numel(), chunk):
            model(input_ids=ids[start : start + chunk].unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
        del model
    return {i: torch.cat(v) for i, v in seen.items()}


def data_router_rows(kind: str, inputs: dict[int, torch.Tensor], copies: int, seed: int) -> dict[int, torch.Tensor]:
    """One router row per copy and layer: k-means centroids or principal directions, logits scaled to std 1."""
    rows: dict[int, torch.Tensor] = {}
    for layer, x in inputs.items():
        if kind == "kmeans":
            r = spherical_kmeans(x, copies, seed=seed + layer)
        elif kind == "pca":
            r = principal_directions(x, copies)
        else:  # pragma: no cover - validated by the caller
            raise MoEConfigError(f"unknown data router init {kind!r}")
        rows[layer] = scale_router_rows(r, x)
    return rows
