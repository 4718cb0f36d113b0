"""Upcycle a dense model into a Mixture-of-Experts model and check it is the same function.

    python examples/upcycle.py                     # builds a tiny random Qwen2 so it runs offline
    python examples/upcycle.py --src ./my-llama    # any local Llama/Mistral/Qwen2/Qwen3/OLMo2 folder

The same from the command line:

    moe-patch upcycle ./qwen2 ./qwen2-moe --num-experts 12 --top-k 6 --granularity 4 --shared-experts 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from converters import UpcycleConfig, plan_upcycle, upcycle


def tiny_dense(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="dense model folder (default: a tiny random Qwen2)")
    ap.add_argument("--out", type=Path, help="output folder (default: a temporary folder)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="upcycle-example-"))
    src = args.src or tiny_dense(work / "dense")
    out = args.out or work / "moe"

    # Fine-grained experts: each FFN cut into 4 slices; 1 slice becomes Qwen2-MoE's shared expert and the
    # other 3 are copied 4 times -> 12 routed experts, 6 per token (= 2 copies' worth). Exact at init.
    config = UpcycleConfig(num_experts=12, top_k=6, granularity=4, shared_experts=1, moe_layers="every-2", seed=0)

    plan = plan_upcycle(src, config)  # configs and headers only: what --dry-run prints
    print(plan.summary())
    plan.weights.close()

    report = upcycle(src, out, config)  # streams the weights, then verifies against the dense model
    print(report)
    print(f"report: {out / 'upcycle_report.json'}")

    # The result is a stock transformers checkpoint: no custom code needed to load, train or serve it.
    moe = AutoModelForCausalLM.from_pretrained(out)
    print(type(moe).__name__, f"{moe.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
