"""Upcycle a dense checkpoint into a Mixture-of-Experts model and continue training it with transformers' Trainer.

    python examples/train_upcycled.py                  # a small random Llama and the Python stdlib as corpus
    python examples/train_upcycled.py --dense ./my-llama --data ./my-corpus/ --steps 2000 --out ./run
    python examples/train_upcycled.py --lora           # LoRA on the experts (peft target_parameters) + attention
    torchrun --nproc_per_node 2 examples/train_upcycled.py --out ./run             # DDP, 2 processes
    accelerate launch --multi_gpu --num_processes 2 examples/train_upcycled.py --out ./run   # through accelerate

What it does, in order:
1. ``converters.upcycle`` turns the dense checkpoint into a stock Mixtral (plain copies, random router),
   checked against the dense model (logits and greedy tokens) before it is written.
2. The MoE is loaded with plain transformers, its own router load-balancing loss switched on through the
   config (``output_router_logits``, ``router_aux_loss_coef``) and patched (``moe_patch.patch_model``:
   exact gradients, faster dispatch).
3. Local text (files or folders; default: this Python's standard library sources) is tokenised with the
   checkpoint's tokenizer and cut into blocks; a share of the files is held out.
4. ``MoETrainer`` trains it: separate router / expert learning rates (the Trainer's optimizer groups split by
   role), an optional router z-loss, and ``RoutingCallback`` logging load balance, entropy, z-loss and
   routing stability through the Trainer's own logging (``--report-to tensorboard`` to see them there).
5. OUT receives the trained model (``model/``), ``routing.json``, ``routing.png`` (if matplotlib is
   installed) and ``result.json`` (held-out loss before and after).

Nothing is downloaded. Without --dense, a small random Llama and a byte-level BPE trained on the corpus are
made first, so the whole run works offline on a CPU.

Under several processes (torchrun, accelerate launch) --batch is per process, so the global batch is
--batch x --grad-accum x processes; the main process of each node upcycles while the others wait, every process
trains its share of each batch, and process 0 writes the results. The router losses keep the weight they have
in one process (MoETrainer), and the routing figures count every process's tokens (RoutingCallback).
docs/scale-out.md has the launch commands for FSDP and for GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import moe_patch
from converters import UpcycleConfig, upcycle
from moe_patch.atomic import write_bytes
from moe_patch.training import (
    MoETrainer,
    RoutingCallback,
    TokenBlocks,
    enable_router_aux_loss,
    expert_lora_config,
    held_out_loss,
    python_stdlib_files,
    small_dense_llama,
    split_held_out,
    text_files,
    train_byte_bpe,
)

logger = logging.getLogger("train_upcycled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("input / output")
    io.add_argument(
        "--dense", type=Path, help="dense Llama/Mistral/Qwen2/Qwen3/OLMo2 folder (default: a small random Llama)"
    )
    io.add_argument("--data", type=Path, nargs="+", help="text files or folders (default: the Python standard library)")
    io.add_argument("--corpus-files", type=int, help="use only the first N corpus files")
    io.add_argument("--out", type=Path, help="output folder (default: a new temporary folder)")
    io.add_argument("--report-to", default="none", help="Trainer report_to: none, tensorboard, wandb, ...")
    moe = ap.add_argument_group("upcycling")
    moe.add_argument("--experts", type=int, default=8)
    moe.add_argument("--top-k", type=int, default=2)
    tr = ap.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=200)
    tr.add_argument("--batch", type=int, default=8, help="sequences per process and micro-batch")
    tr.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    tr.add_argument("--block", type=int, default=128, help="tokens per training sequence")
    tr.add_argument("--lr", type=float, default=3e-4, help="learning rate of everything but routers and experts")
    tr.add_argument("--router-lr", type=float, default=3e-3, help="routers' learning rate (new, random: higher)")
    tr.add_argument("--expert-lr", type=float, default=None, help="routed experts' learning rate (default: --lr)")
    tr.add_argument("--aux-loss-coef", type=float, default=0.01, help="router load-balancing loss weight")
    tr.add_argument("--z-loss", type=float, default=1e-3, help="router z-loss weight (0: off)")
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--lora", action="store_true", help="train LoRA adapters on the experts and attention only")
    tr.add_argument("--lora-rank", type=int, default=8)
    tr.add_argument("--seed", type=int, default=0)
    small = ap.add_argument_group("the small random Llama (without --dense)")
    small.add_argument("--hidden", type=int, default=128)
    small.add_argument("--layers", type=int, default=4)
    small.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args(argv)
    if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ap.error("--out is required under several processes (each would make its own temporary folder)")
    return args


def make_dense(work: Path, files: list[Path], args: argparse.Namespace) -> Path:
    """A small random Llama with a byte-level BPE trained on the training files, saved as a checkpoint."""
    tokenizer = train_byte_bpe(files, vocab_size=args.vocab)
    model = small_dense_llama(
        len(tokenizer), hidden=args.hidden, layers=args.layers, eos_token_id=tokenizer.eos_token_id, seed=args.seed
    )
    path = work / "dense"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="train-upcycled-"))
    out.mkdir(parents=True, exist_ok=True)
    files = text_files(args.data) if args.data else python_stdlib_files()
    files = files[: args.corpus_files] if args.corpus_files else files
    train_files, held_files = split_held_out(files, share=0.1)
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(20, args.steps // 10),
        weight_decay=0.0,
        logging_steps=args.log_every,
        save_strategy="no",
        report_to=args.report_to,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
        # fused experts get a gradient at every step, so DDP need not search for unused parameters (experts kept
        # as a ModuleList of MLPs would need True: an expert no token picked has none)
        ddp_find_unused_parameters=False,
    )

    # 1. dense -> MoE, exact at init (verified before anything is written); once per node, the others wait
    moe_dir = out / "moe-init"
    with targs.main_process_first(desc="upcycle"):
        if targs.local_process_index == 0:
            dense = args.dense or make_dense(out, train_files, args)
            upcycle(
                dense,
                moe_dir,
                UpcycleConfig(num_experts=args.experts, top_k=args.top_k, seed=args.seed, overwrite=True),
            )

    # 2. load with plain transformers, router losses on, moe-patch dispatch
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    aux = enable_router_aux_loss(model, args.aux_loss_coef)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(
            model, expert_lora_config(model, r=args.lora_rank, alpha=2 * args.lora_rank, attention=True)
        )
        model.print_trainable_parameters()
    moe_patch.patch_model(model)  # logs what it patched (INFO)

    # 3. data
    train = TokenBlocks.from_files(train_files, tokenizer, args.block)
    held = TokenBlocks.from_files(held_files, tokenizer, args.block, max_tokens=32 * args.block)
    logger.info("corpus: %d training blocks (%d tokens), %d held-out blocks", len(train), train.tokens, len(held))
    before = held_out_loss(model, held)

    # 4. train
    trainer = MoETrainer(
        model=model,
        args=targs,
        train_dataset=train,
        router_lr=args.router_lr,
        expert_lr=args.expert_lr,
        router_z_loss_coef=args.z_loss if aux is not None else 0.0,
    )
    routing = RoutingCallback(trainer, every=args.log_every, stability_inputs={"input_ids": held.blocks[:4]})
    trainer.add_callback(routing)
    trainer.train()
    after = held_out_loss(model, held)
    result = {
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "steps": args.steps,
        "processes": targs.world_size,
        "global_batch": args.batch * args.grad_accum * targs.world_size,
        "router_aux_loss_coef": aux,
        "lora": args.lora,
        "out": str(out),
        "log_history": trainer.state.log_history,
    }
    if not trainer.is_world_process_zero():
        return result

    # 5. results (process 0)
    final = model.merge_and_unload() if args.lora else model
    moe_patch.unpatch_model(final)
    final.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_bytes(out / "routing.json", routing.to_json().encode())
    try:
        routing.plot(out / "routing.png")
    except moe_patch.MoEPatchError as exc:  # matplotlib missing: the figures are in routing.json all the same
        logger.warning("%s", exc)
    print(routing.summary())
    write_bytes(out / "result.json", json.dumps(result, indent=2).encode())
    print(
        f"held-out loss {before:.3f} -> {after:.3f} (ppl {math.exp(before):.1f} -> {math.exp(after):.1f}); "
        f"results in {out}"
    )
    return result


if __name__ == "__main__":
    # one process reports progress; the others only warnings (every process trains)
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING, format="%(message)s"
    )
    main()
