"""Time `moe-patch inspect` on full-size configs (no weights: config.json only), cold process each.

    ./dev bench inspect

Target: under 5 s per config, import of transformers included.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "DeepSeek-V3 (671B)": "from transformers import DeepseekV3Config as C; c = C()",
    "Qwen3-235B-A22B": (
        "from transformers import Qwen3MoeConfig as C; c = C(hidden_size=4096, num_hidden_layers=94, "
        "num_attention_heads=64, num_key_value_heads=4, moe_intermediate_size=1536, num_experts=128, "
        "num_experts_per_tok=8, vocab_size=151936)"
    ),
    "Mixtral-8x7B": "from transformers import MixtralConfig as C; c = C()",
}


def main() -> None:
    print("| config | cold `moe-patch inspect` s (median of 3) | total params |")
    print("|---|---|---|")
    for name, code in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-c", f"{code}; c.save_pretrained({tmp!r})"], check=True)
            times, out = [], ""
            for _ in range(3):
                t0 = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-m", "moe_patch.cli", "inspect", tmp], check=True, capture_output=True, text=True
                ).stdout
                times.append(time.perf_counter() - t0)
            total = next(
                (line.split("params total ")[1].split(",")[0] for line in out.splitlines() if "params total" in line),
                "?",
            )
            print(f"| {name} | {statistics.median(times):.2f} | {total} |", flush=True)


if __name__ == "__main__":
    main()
