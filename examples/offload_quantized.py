"""Offload FP8 and MXFP4 checkpoints in their stored bytes: DeepSeek-V3 / Qwen3-FP8 / Kimi-K2 (block FP8),
gpt-oss (MXFP4), compressed-tensors releases (int4 groups, FP8).

    python examples/offload_quantized.py openai/gpt-oss-20b --device cuda --expert-cache 4GiB --host-cache 16GiB
    python examples/offload_quantized.py Qwen/Qwen3-30B-A3B-FP8 --device cuda --expert-cache 6GiB --host-cache 24GiB
    python examples/offload_quantized.py --demo       # no download: tiny FP8 and MXFP4 checkpoints built here

Nothing is dequantized at load: the host cache and every disk read hold an expert exactly as stored
(FP8 weights + block scales, FP4 blocks + e8m0 scales), so gpt-oss-120b's 61 GB of experts fit in 64 GiB
of RAM where a bf16 copy would need 229 GB. An expert is decoded where it is computed: on the GPU
right after its copy (PCIe moves the stored bytes), or on the CPU inside its compute. Whether the GPU
cache keeps experts stored (more of them) or decoded (no decode per use) is the cost model's choice,
or ``--device-format``; the statistics say which.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import moe_patch
from moe_patch.offload import OffloadOptions, get_offload_handle


def demo_checkpoints(root: Path) -> list[Path]:
    """A tiny random DeepSeek-V3 in block FP8 and a tiny gpt-oss in MXFP4, saved as their releases are."""
    import transformers

    from moe_patch.testing.quantized import pack_fp8, pack_mxfp4

    torch.manual_seed(0)
    ds = transformers.DeepseekV3Config(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=0,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    oss = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    out = []
    for name, cfg, pack in (("deepseek-v3-fp8", ds, pack_fp8), ("gpt-oss-mxfp4", oss, pack_mxfp4)):
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        model.save_pretrained(root / f"{name}-bf16")
        out.append(pack(root / f"{name}-bf16", root / name))
    return out


def run(path: str | Path, args: argparse.Namespace) -> None:
    model = moe_patch.load_model(
        path,
        device=args.device,
        dtype="auto",
        options=OffloadOptions(
            device=args.device,
            expert_cache=args.expert_cache,
            host_cache=args.host_cache,
            device_format=args.device_format,
        ),
    )
    handle = get_offload_handle(model)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    except (OSError, ValueError):  # the demo checkpoints have no tokenizer
        tokenizer, ids = None, torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model.generate(ids.to(args.device), max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1] :]
    print(tokenizer.decode(new) if tokenizer is not None else new.tolist())
    print(handle.stats)
    handle.detach(restore_weights=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="local checkpoint directory or Hub repo id")
    p.add_argument("--demo", action="store_true", help="build tiny FP8 and MXFP4 checkpoints here and run both")
    p.add_argument("--prompt", default="The three laws of thermodynamics are")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--expert-cache", default="4GiB", help="device-cache budget (stored bytes or decoded, see below)")
    p.add_argument("--host-cache", default="0", help="host-RAM cache budget in stored bytes (pinned on CUDA)")
    p.add_argument("--device-format", choices=["auto", "stored", "dequantized"], default="auto")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    if args.demo or args.model is None:
        with tempfile.TemporaryDirectory() as tmp:
            args.expert_cache = "256KiB"  # a fraction of the tiny models' experts
            for path in demo_checkpoints(Path(tmp)):
                print(f"== {path.name}")
                run(path, args)
        return
    run(args.model, args)


if __name__ == "__main__":
    main()
