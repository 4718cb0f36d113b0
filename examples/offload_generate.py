"""Generate with a MoE checkpoint larger than memory: routed experts stay in the safetensors files.

    python examples/offload_generate.py Qwen/Qwen3-30B-A3B --device cuda --expert-cache 8GiB --host-cache 24GiB \
        --prompt "Explain mixture-of-experts in two sentences."

Non-expert weights (attention, embeddings, norms, routers, shared experts) load normally; each routed
expert is read alone when the router first picks it and then kept in the device cache (LRU, 8 GiB)
and the host cache (pinned RAM, 24 GiB). The statistics printed at the end give the hit rate, the
bytes read per tier per token and the decode time against the bandwidth bound.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, TextStreamer

import moe_patch
from moe_patch.offload import get_offload_handle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="local checkpoint directory or Hub repo id")
    p.add_argument("--prompt", default="The three laws of thermodynamics are")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--expert-cache", default="8GiB", help="device-cache budget (on CPU: the resident RAM tier)")
    p.add_argument("--host-cache", default="0", help="host-RAM cache budget (pinned on CUDA)")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None, help="keep cached experts quantized")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--plot", default=None, help="write the expert-utilisation heatmap to this PNG")
    args = p.parse_args()

    model = moe_patch.load_model(
        args.model,
        device=args.device,
        expert_cache=args.expert_cache,
        host_cache=args.host_cache,
        quantize_experts=args.quantize,
        dtype="auto",
    )
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path or args.model)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=TextStreamer(tokenizer, skip_prompt=True),
        )
    handle = get_offload_handle(model)
    print(handle.stats)
    if args.quantize:
        print("logit error vs full precision:", handle.quantization_error(inputs["input_ids"]))
    if args.plot:
        handle.stats.plot_utilisation(args.plot)


if __name__ == "__main__":
    main()
