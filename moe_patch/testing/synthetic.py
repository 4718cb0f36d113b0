"""Random-weight checkpoints with the layer shapes of real MoE releases, saved as those releases are.

For benchmarks (``bench/offload.py``, ``bench/decode.py``): nothing is downloaded; weights are random,
shapes, key names, shard layout and formats are the real ones. Builds are atomic (a killed build leaves
no half-written folder) and reused when the folder exists.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

#: the real checkpoints whose layer shapes the synthetic ones take
SHAPES = {
    "qwen3": dict(name="Qwen3-30B-A3B", hidden=2048, inter=768, experts=128, top_k=8),
    "gpt-oss": dict(name="gpt-oss-20b", hidden=2880, inter=2880, experts=32, top_k=4),
    # the full-size disk-bound run: written as MXFP4 directly (a bf16 twin would be 4x the disk), real vocabulary
    "gpt-oss-120b": dict(name="gpt-oss-120b", hidden=2880, inter=2880, experts=128, top_k=4, vocab=201088),
    # a small model, where a step's fixed per-layer costs weigh most (the engine's bookkeeping against patch_model)
    "qwen3-small": dict(
        name="Qwen3-MoE-small", hidden=512, inter=256, experts=32, top_k=4, heads=8, kv_heads=2, head_dim=64
    ),
}
#: checkpoint format -> the shapes its benchmark uses (the FP8 releases are Qwen3's, MXFP4 gpt-oss's)
FORMAT_SHAPES = {"bf16": "qwen3", "fp8": "qwen3", "mxfp4": "gpt-oss"}


def config(layers: int, shape: str = "qwen3"):
    from transformers import GptOssConfig, Qwen3MoeConfig

    s = SHAPES[shape]
    if shape.startswith("gpt-oss"):
        # gpt-oss-20b's layers; vocabulary 32000 instead of 201088 (its embeddings would be 2.3 GB of the
        # non-expert weights here, which only dilutes what this benchmark measures)
        return GptOssConfig(
            vocab_size=s.get("vocab", 32000),
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=layers,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=s["experts"],
            num_experts_per_tok=s["top_k"],
            sliding_window=128,
            max_position_embeddings=4096,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
            tie_word_embeddings=False,
            dtype="bfloat16",
            pad_token_id=0,
            eos_token_id=None,
            bos_token_id=None,
        )
    return Qwen3MoeConfig(
        vocab_size=32000,
        hidden_size=s["hidden"],
        intermediate_size=3 * s["hidden"],
        moe_intermediate_size=s["inter"],
        num_hidden_layers=layers,
        num_attention_heads=s.get("heads", 32),
        num_key_value_heads=s.get("kv_heads", 4),
        head_dim=s.get("head_dim", 128),
        num_experts=s["experts"],
        num_experts_per_tok=s["top_k"],
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )


def _atomic_folder(path: Path, fill) -> Path:
    """Build a checkpoint folder with ``fill(tmp)`` and rename it into place (a killed build leaves no half)."""
    if (path / "model.safetensors.index.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    os.sync()  # dirty pages cannot be dropped from the page cache; write them out now
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def build_checkpoint(path: Path, layers: int, shape: str = "qwen3", experts: str = "bf16") -> Path:
    """Random bf16 weights saved like the real checkpoint (Qwen3: per-expert keys; gpt-oss: fused
    experts), one safetensors shard per layer, written atomically. ``experts="mxfp4"`` (gpt-oss shapes) writes
    the experts as the gpt-oss releases store them, random blocks and scales drawn directly (no bf16 values:
    gpt-oss-120b has 117 B of them)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if experts not in ("bf16", "mxfp4") or (experts == "mxfp4" and not shape.startswith("gpt-oss")):
        raise ValueError(f"experts={experts!r} for {shape} shapes: MXFP4 experts are written for gpt-oss shapes only")

    def fill(tmp: Path) -> None:
        cfg = config(layers, shape)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        where = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are the slow part on CPU
        gen = torch.Generator(where).manual_seed(0)

        def rand(shape_, std=0.02):
            return (torch.randn(shape_, generator=gen, device=where) * std).to(torch.bfloat16).cpu()

        per_expert = not shape.startswith("gpt-oss")  # gpt-oss checkpoints store the experts fused
        params = meta.state_dict()
        weight_map: dict[str, str] = {}
        owners = sorted({int(n.split(".")[2]) if n.startswith("model.layers.") else -1 for n in params})
        for layer in owners:
            shard: dict[str, torch.Tensor] = {}
            for name, p in params.items():
                owner = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
                if owner != layer:
                    continue
                if per_expert and name.endswith("experts.gate_up_proj"):
                    prefix = name[: -len("gate_up_proj")]
                    for e in range(p.shape[0]):
                        shard[f"{prefix}{e}.gate_proj.weight"] = rand((p.shape[1] // 2, p.shape[2]))
                        shard[f"{prefix}{e}.up_proj.weight"] = rand((p.shape[1] // 2, p.shape[2]))
                elif per_expert and name.endswith("experts.down_proj"):
                    prefix = name[: -len("down_proj")]
                    for e in range(p.shape[0]):
                        shard[f"{prefix}{e}.down_proj.weight"] = rand(tuple(p.shape[1:]))
                elif experts == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    n_exp, d_in, d_out = p.shape  # the model holds [E, in, out]; stored [E, out, in/32, 16]
                    u8 = dict(generator=gen, device=where, dtype=torch.uint8)
                    shard[name + "_blocks"] = torch.randint(0, 256, (n_exp, d_out, d_in // 32, 16), **u8).cpu()
                    # exponents around 2**-6: values of the size a trained expert's weights have
                    shard[name + "_scales"] = torch.randint(118, 124, (n_exp, d_out, d_in // 32), **u8).cpu()
                elif name.endswith("norm.weight"):
                    shard[name] = torch.ones(p.shape, dtype=torch.bfloat16)
                elif name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                    shard[name] = rand(p.shape, std=0.5)  # a router that routes decisively
                else:
                    shard[name] = rand(p.shape)
            fname = f"model-{'other' if layer < 0 else f'layer{layer:03d}'}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
            del shard
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        cfg.architectures = [type(meta).__name__]  # what converters (llama.cpp's) dispatch on
        if experts == "mxfp4":
            from moe_patch.testing.quantized import mxfp4_config

            cfg.quantization_config = mxfp4_config()
        cfg.save_pretrained(tmp)

    return _atomic_folder(path, fill)


def build_quantized(bf16: Path, path: Path, fmt: str) -> Path:
    """The bf16 checkpoint rewritten shard by shard as the real releases store it: FP8 with 128x128 block
    scales on every linear weight (Qwen3-30B-A3B-FP8) or MXFP4 experts (gpt-oss)."""
    from moe_patch.testing.quantized import pack_fp8, pack_mxfp4

    def fill(tmp: Path) -> None:
        shutil.rmtree(tmp)
        (pack_fp8 if fmt == "fp8" else pack_mxfp4)(bf16, tmp)

    return _atomic_folder(path, fill)


def drop_page_cache(path: Path, pattern: str = "*.safetensors") -> None:
    """Write out and drop the page cache of the files matching ``pattern`` in ``path`` (a cold "disk" tier)."""
    os.sync()
    for f in Path(path).glob(pattern):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_bytes() -> int:
    """This process's peak resident set (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: after a fork and an
    exec it still reports the parent's address space (a benchmark's worker then "peaks" at its driver's RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
