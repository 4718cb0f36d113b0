"""Patch a local MoE checkpoint with moe-patch and generate.

    python examples/patch_local_model.py PATH [--prompt-ids 1,2,3] [--tokens 32]

With no PATH it writes a small random Qwen3-MoE checkpoint first (no download). With a tokenizer in
the folder, pass --prompt "text" instead of token ids.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_patch
from moe_patch.demo import build_demo_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", help="local checkpoint folder (default: build a random one)")
    ap.add_argument("--prompt", help="text prompt (needs a tokenizer in the folder)")
    ap.add_argument("--prompt-ids", default="1,2,3,4,5", help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    path = args.path or build_demo_checkpoint(tempfile.mkdtemp() + "/qwen3-moe-random")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    print(moe_patch.inspect_model(model))  # what was found
    print(moe_patch.patch_model(model))  # what was patched

    if args.prompt:
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok(args.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
    out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    print(tok.decode(out[0]) if args.prompt else out[0].tolist())

    moe_patch.unpatch_model(model)  # back to the Hugging Face forward


if __name__ == "__main__":
    main()
