"""Sparse Upcycling (Komatsuzaki et al., 2022) at CPU scale: dense vs its 8-expert upcycle, same extra steps.

    python bench/upcycle_training.py --out bench-results/upcycle_training     # ~30 minutes on 2 CPU cores
    python bench/upcycle_training.py --tiny --out /tmp/upcycle_training       # a one-minute smoke run

1. Corpus: this Python's standard library sources (nothing downloaded), 5% of the files held out; a
   byte-level BPE is trained on the training files with ``tokenizers``.
2. A small dense Llama is pretrained for ``--pretrain-steps`` (transformers' Trainer, AdamW, warmup then
   constant learning rate) and saved.
3. From that checkpoint, for the same ``--steps`` on the same next blocks of the corpus, in the same order:
   (a) the dense model trained on; (b) ``converters.upcycle`` into a Mixtral with ``--experts`` plain copies
   (as in the paper; ``--drop-ratio`` / ``--noise`` for drop-upcycling or noisy copies) and a random router,
   top-``--top-k`` (plain copies are exact at init; the upcycle verifies it), trained with its load-balancing loss
   through ``moe_patch.patch_model`` and ``MoETrainer``, routing logged by ``RoutingCallback``. Both start
   from a fresh optimizer with the same warmup.
4. Held-out loss (next-token cross-entropy, no auxiliary loss) every ``--eval-every`` steps; training
   tokens/s (evaluation time excluded); training FLOPs per token, analytic: 3 x (2 x active parameters
   without the embedding lookup + 2 x layers x context x hidden for attention), Kaplan et al. 2020's count.
5. Written to ``--out``: ``results.json`` (every curve, the routing history, the machine), ``upcycle_training.png``
   (held-out loss against extra training FLOPs and steps, routing balance per step), and a markdown table
   on stdout for docs/benchmarks.md. The paper's claim is that (b) reaches a lower loss for the same extra
   compute; the table states both comparisons (same steps, same extra FLOPs), whichever way they come out.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/ shadows stdlib names

import argparse
import io
import json
import logging
import math
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import moe_patch
from converters import UpcycleConfig, upcycle
from moe_patch.atomic import write_bytes
from moe_patch.training import (
    MoETrainer,
    RoutingCallback,
    TokenBlocks,
    enable_router_aux_loss,
    held_out_loss,
    python_stdlib_files,
    small_dense_llama,
    split_held_out,
    train_byte_bpe,
)

logger = logging.getLogger("upcycle_training")

# About 30 minutes on a quiet 2-core CPU (measured on a busy one: dense 404, upcycled 138 training tokens/s).
FULL = dict(
    hidden=256,
    layers=4,
    vocab=4096,
    seq=256,
    batch=8,
    pretrain_steps=200,
    steps=150,
    eval_every=25,
    eval_blocks=48,
    corpus_files=None,
)
TINY = dict(
    hidden=32,
    layers=2,
    vocab=300,
    seq=32,
    batch=4,
    pretrain_steps=12,
    steps=12,
    eval_every=4,
    eval_blocks=8,
    corpus_files=40,
)


@dataclass
class Curve:
    """Held-out loss of one run against steps, training tokens, training FLOPs and training seconds."""

    name: str
    flops_per_token: float
    total_params: int
    active_params: int
    points: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else math.nan

    def loss_at(self, key: str, x: float) -> float:
        """Held-out loss linearly interpolated at ``x`` (steps, flops or seconds); NaN outside the curve."""
        pts = self.points
        for a, b in zip(pts, pts[1:]):
            if a[key] <= x <= b[key]:
                t = (x - a[key]) / (b[key] - a[key]) if b[key] > a[key] else 0.0
                return a["loss"] + t * (b["loss"] - a["loss"])
        return math.nan


class HeldOut(TrainerCallback):
    """Held-out loss at step 0 and every ``every`` steps; training time with evaluation time left out."""

    def __init__(self, curve: Curve, data: TokenBlocks, every: int, tokens_per_step: int):
        self.curve, self.data, self.every, self.tokens_per_step = curve, data, every, tokens_per_step
        self._t0 = 0.0
        self._eval_s = 0.0

    def _record(self, model, step: int) -> None:
        t = time.perf_counter()
        loss = held_out_loss(model, self.data)
        self._eval_s += time.perf_counter() - t
        seconds = time.perf_counter() - self._t0 - self._eval_s
        tokens = step * self.tokens_per_step
        self.curve.points.append(
            {
                "step": step,
                "tokens": tokens,
                "flops": tokens * self.curve.flops_per_token,
                "seconds": seconds,
                "loss": loss,
            }
        )
        logger.info("%s step %d: held-out loss %.4f", self.curve.name, step, loss)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._t0, self._eval_s = time.perf_counter(), 0.0
        self._record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == args.max_steps:
            self._record(model, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.curve.train_seconds = time.perf_counter() - self._t0 - self._eval_s
        self.curve.train_tokens = state.global_step * self.tokens_per_step


def train_flops_per_token(model, seq: int) -> tuple[float, int, int]:
    """(3 x forward FLOPs per token, total parameters, active parameters), Kaplan et al. 2020's count: the
    embedding lookup is free, every other active weight costs 2 FLOPs per token, attention 2 x layers x
    context x hidden."""
    report = moe_patch.inspect_model(model)
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    forward = 2 * (report.active_params - embed) + 2 * cfg.num_hidden_layers * seq * cfg.hidden_size
    return 3.0 * forward, report.total_params, report.active_params


def training_args(out: Path, steps: int, args: argparse.Namespace, *, warmup: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=warmup,
        weight_decay=0.01,
        adam_beta2=0.95,
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run(
    trainer_cls, model, name: str, data, held: TokenBlocks, out: Path, args, steps: int, extra=None, **trainer_kwargs
) -> tuple[Curve, object]:
    """Train ``model`` for ``steps`` (warmup: 5% of them) with held-out loss recorded along the way."""
    flops, total, active = train_flops_per_token(model, args.seq)
    curve = Curve(name=name, flops_per_token=flops, total_params=total, active_params=active)
    targs = training_args(out, steps, args, warmup=max(1, steps // 20))
    trainer = trainer_cls(model=model, args=targs, train_dataset=data, **trainer_kwargs)
    trainer.add_callback(HeldOut(curve, held, args.eval_every, args.batch * args.seq))
    for cb in extra(trainer) if extra else []:
        trainer.add_callback(cb)
    trainer.train()
    return curve, trainer


def plot(curves: list[Curve], routing_history: list, path: Path) -> None:
    from moe_patch.monitoring.plot import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for c in curves:
        axes[0].plot([p["flops"] / 1e12 for p in c.points], [p["loss"] for p in c.points], marker=".", label=c.name)
        axes[1].plot([p["step"] for p in c.points], [p["loss"] for p in c.points], marker=".", label=c.name)
    axes[0].set_xlabel("extra training compute (TFLOPs)")
    axes[1].set_xlabel("extra training steps")
    for ax in axes[:2]:
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend()
    steps = [r.step for r in routing_history]
    axes[2].plot(steps, [max(r.figure("load_cv")) for r in routing_history], label="load CV, worst layer")
    axes[2].plot(
        steps, [sum(r.figure("entropy")) / len(r.layers) for r in routing_history], label="router entropy / log E, mean"
    )
    axes[2].set_xlabel("step")
    axes[2].set_title("upcycled model's routing")
    axes[2].legend()
    fig.suptitle("Sparse Upcycling at CPU scale: dense vs 8-expert top-2 upcycle from the same checkpoint")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def table(dense: Curve, moe: Curve, args) -> str:
    rows = [
        "| model | params total / active | train FLOPs/token | tokens/s | held-out loss at start | "
        f"after {args.steps} steps | at dense's extra FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    budget = dense.points[-1]["flops"]
    for c in (dense, moe):
        rows.append(
            f"| {c.name} | {c.total_params / 1e6:.2f}M / {c.active_params / 1e6:.2f}M | "
            f"{c.flops_per_token / 1e6:.1f}M | {c.tokens_per_s:.0f} | {c.points[0]['loss']:.4f} | "
            f"{c.points[-1]['loss']:.4f} | {c.loss_at('flops', budget):.4f} |"
        )
    same_steps = moe.points[-1]["loss"] - dense.points[-1]["loss"]
    same_flops = moe.loss_at("flops", budget) - dense.points[-1]["loss"]
    same_time = moe.loss_at("seconds", dense.points[-1]["seconds"]) - dense.points[-1]["loss"]
    rows.append("")
    rows.append(
        f"upcycled minus dense held-out loss: {same_steps:+.4f} after the same {args.steps} steps, "
        f"{same_flops:+.4f} at the same extra training FLOPs ({budget:.3g}), "
        f"{same_time:+.4f} at the same training time (negative: the upcycled model is better)."
    )
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json and upcycle_training.png")
    ap.add_argument("--tiny", action="store_true", help="smoke-run sizes (about a minute)")
    for key, value in FULL.items():
        ap.add_argument(
            "--" + key.replace("_", "-"), type=int, default=None, help=f"default {value} ({TINY[key]} with --tiny)"
        )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--router-lr", type=float, default=None, help="upcycled model's router learning rate (default --lr)"
    )
    ap.add_argument("--aux-loss-coef", type=float, default=0.01)
    ap.add_argument("--drop-ratio", type=float, default=0.0, help="drop-upcycling instead of plain copies (e.g. 0.5)")
    ap.add_argument("--noise", type=float, default=0.0, help="relative noise on the expert copies")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in OUT/work")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work" if args.keep else Path(tempfile.mkdtemp(prefix="upcycle-training-"))
    started = time.perf_counter()
    try:
        # 1. corpus and tokenizer
        files = python_stdlib_files(limit=args.corpus_files)
        train_files, held_files = split_held_out(files, share=0.05)
        tokenizer = train_byte_bpe(train_files, vocab_size=args.vocab)
        blocks = TokenBlocks.from_files(train_files, tokenizer, args.seq)
        held = TokenBlocks(TokenBlocks.from_files(held_files, tokenizer, args.seq).blocks[: args.eval_blocks])
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))
        need_pre, need = args.pretrain_steps * args.batch, args.steps * args.batch
        if need_pre + need > len(blocks):
            raise SystemExit(
                f"the corpus has {len(blocks)} blocks of {args.seq} tokens; pretraining and training "
                f"need {need_pre + need}: lower the steps, batch or sequence length"
            )
        pre_data = TokenBlocks(blocks.blocks[order[:need_pre]])
        next_data = TokenBlocks(blocks.blocks[order[need_pre : need_pre + need]])  # the same for (a) and (b)
        logger.info(
            "corpus: %d files, %d training blocks x %d tokens, %d held-out blocks",
            len(files),
            len(blocks),
            args.seq,
            len(held),
        )

        # 2. pretrain the dense model
        dense = small_dense_llama(
            len(tokenizer), hidden=args.hidden, layers=args.layers, eos_token_id=tokenizer.eos_token_id, seed=args.seed
        )
        pre_curve, _ = run(Trainer, dense, "pretrain", pre_data, held, work / "pretrain", args, args.pretrain_steps)
        dense_dir = work / "dense"
        dense.save_pretrained(dense_dir)
        tokenizer.save_pretrained(dense_dir)
        del dense

        # 3a. dense, continued
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
        dense_curve, _ = run(Trainer, dense, "dense (continued)", next_data, held, work / "a", args, args.steps)
        del dense

        # 3b. upcycled, continued
        moe_dir = work / "moe"
        up = upcycle(
            dense_dir,
            moe_dir,
            UpcycleConfig(
                num_experts=args.experts, top_k=args.top_k, seed=args.seed, drop_ratio=args.drop_ratio, noise=args.noise
            ),
        )
        moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
        enable_router_aux_loss(moe, args.aux_loss_coef)
        moe_patch.patch_model(moe)
        routing: list[RoutingCallback] = []

        def callbacks(trainer):
            routing.append(
                RoutingCallback(trainer, every=args.eval_every, stability_inputs={"input_ids": held.blocks[:4]})
            )
            return routing

        moe_curve, _ = run(
            MoETrainer,
            moe,
            f"upcycled {args.experts}x top-{args.top_k}",
            next_data,
            held,
            work / "b",
            args,
            args.steps,
            extra=callbacks,
            router_lr=args.router_lr,
        )
        cb = routing[0]
        plot([dense_curve, moe_curve], cb.history, args.out / "upcycle_training.png")
        results = {
            "command": " ".join(["python", "bench/upcycle_training.py"] + (argv if argv is not None else sys.argv[1:])),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "upcycle": {"exact": up.recipe["exact"], "verification": up.verification},
            "curves": [asdict(c) | {"tokens_per_s": c.tokens_per_s} for c in (pre_curve, dense_curve, moe_curve)],
            "routing": {"final": cb.monitor.report().to_dict(), "history": [r.to_dict() for r in cb.history]},
            "wall_s": time.perf_counter() - started,
        }
        write_bytes(args.out / "results.json", json.dumps(results, indent=2).encode())
        print(table(dense_curve, moe_curve, args))
        print()
        print(cb.monitor.summary())
        print(
            f"\nresults: {args.out / 'results.json'}, plot: {args.out / 'upcycle_training.png'} "
            f"({results['wall_s'] / 60:.1f} min)"
        )
        return results
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    main()
