"""A smaller twin of examples/train_upcycled.py for the distributed tests (run as a script, not collected).

Trains an upcycled MoE with its load-balancing loss and the router z-loss on, on fixed token blocks in order, so
that runs with different process counts see the same global batch at every step:

    python twin_train.py --model DIR --out DIR --batch 8                      # one process
    python twin_train.py --model DIR --out DIR --batch 4 --accum 2            # gradient accumulation
    torchrun --nproc_per_node 2 twin_train.py --model DIR --out DIR --batch 4                 # DDP (the Trainer)
    torchrun --nproc_per_node 2 twin_train.py --model DIR --out DIR --batch 4 --mode fsdp     # FSDP2 (fully_shard)

``--mode trainer`` is ``MoETrainer`` + ``RoutingCallback`` (DDP under torchrun: accelerate's choice on CPU).
``--mode fsdp`` shards every decoder layer and the model with torch's ``fully_shard`` on a CPU mesh (accelerate
trains with DDP on CPU even when asked for FSDP) and runs the Trainer's loss arithmetic by hand: cross-entropy
over the tokens of every process, the router terms weighed by ``weigh_router_losses``, AdamW over
``param_groups`` built after sharding. Every process writes OUT/rank<R>.json; process 0 also OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import moe_patch
from moe_patch.atomic import write_bytes
from moe_patch.training import (
    MoETrainer,
    RoutingCallback,
    TokenBlocks,
    enable_router_aux_loss,
    param_groups,
    parameter_roles,
    router_z_loss,
    sum_over_processes,
    weigh_router_losses,
)

SEQ = 16


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=["trainer", "fsdp"], default="trainer")
    ap.add_argument("--batch", type=int, required=True, help="sequences per process and micro-batch")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--aux", type=float, default=0.1)
    ap.add_argument("--z", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--router-lr", type=float, default=1e-2)
    ap.add_argument("--expert-lr", type=float, default=3e-4)
    return ap.parse_args(argv)


def data(vocab: int, args: argparse.Namespace) -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, vocab, (args.steps * args.global_batch, SEQ), generator=gen))


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # two processes on two cores
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    enable_router_aux_loss(model, args.aux)
    moe_patch.patch_model(model)
    return model.train()


def router_weight(model) -> list[float]:
    w = model.model.layers[0].mlp.gate.weight
    w = w.full_tensor() if hasattr(w, "full_tensor") else w  # FSDP2 shards it (a collective)
    return w.detach().flatten().tolist()


def windows(history) -> list[dict]:
    return [
        {"tokens": [lr.counts.tokens for lr in r.layers], "load": [lr.counts.load for lr in r.layers]} for r in history
    ]


def first_step_update(model, before: dict) -> dict[str, float]:
    """Largest change of any element per role (router / experts / other) since ``before``. With AdamW's first
    step every element with a gradient moves by its group's learning rate, so these are the rates in force."""
    roles = parameter_roles(model)
    out: dict[str, float] = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective under FSDP2
        role = roles.get(id(p), "other")
        out[role] = max(out.get(role, 0.0), float((full.detach() - before[name]).abs().max()))
    return out


def run_trainer(args: argparse.Namespace) -> tuple[dict, dict]:
    from transformers import TrainerCallback, TrainingArguments

    class Logged(TrainerCallback):
        """Counts what reaches on_log with routing figures in this process; measures the first step's update."""

        def __init__(self):
            self.routing_logs, self.before, self.deltas = 0, {}, {}

        def on_log(self, targs, state, control, logs=None, **kwargs):
            self.routing_logs += any(k.startswith("routing/") for k in logs or {})

        def on_train_begin(self, targs, state, control, **kwargs):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == 1:
                self.deltas = first_step_update(model, self.before)

    model = load(args)
    targs = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        seed=0,
    )
    trainer = MoETrainer(
        model=model,
        args=targs,
        train_dataset=data(model.config.vocab_size, args),
        router_lr=args.router_lr,
        expert_lr=args.expert_lr,
        router_z_loss_coef=args.z,
    )
    routing, logged = RoutingCallback(trainer, every=1), Logged()
    trainer.add_callback(routing)
    trainer.add_callback(logged)
    trainer.train()
    history = trainer.state.log_history
    result = {
        "losses": [h["loss"] for h in history if "loss" in h],
        "router0": router_weight(model),
        "windows": windows(routing.history),
        "groups": [{"role": g["role"], "lr": g["lr"]} for g in trainer.optimizer.param_groups],
        "first_step_max_update": logged.deltas,
    }
    rank = {
        "routing": [
            {k: v for k, v in h.items() if k.startswith("routing/")}
            for h in history
            if any(k.startswith("routing/") for k in h)
        ],
        "on_log_with_routing": logged.routing_logs,
        "world_process_zero": trainer.is_world_process_zero(),
    }
    return result, rank


def run_fsdp(args: argparse.Namespace) -> tuple[dict, dict]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load(args)
    mesh = init_device_mesh("cpu", (world,))
    roles_before = sorted(parameter_roles(model).values())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # groups are built from the sharded parameters (DTensors): fully_shard replaced the Parameter objects
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, router_lr=args.router_lr, expert_lr=args.expert_lr), lr=args.lr, weight_decay=0.0
    )
    roles = parameter_roles(model)
    named = dict(model.named_parameters())
    blocks = data(model.config.vocab_size, args).blocks
    monitor = moe_patch.monitor(model, when="train")
    losses, history, deltas = [], [], {}
    for step in range(args.steps):
        before = {n: p.full_tensor().detach().clone() for n, p in named.items()} if step == 0 else None
        start = step * args.global_batch + rank * args.batch
        ids = blocks[start : start + args.batch]
        items = torch.tensor((ids[:, 1:] != -100).sum().item())
        dist.all_reduce(items)  # the Trainer's num_items_in_batch: predicted tokens of every process
        out = model(input_ids=ids, labels=ids, num_items_in_batch=items)
        aux_term = model.router_aux_loss_coef * out.aux_loss
        loss = weigh_router_losses(
            out.loss * world, aux_term=aux_term, z_term=args.z * router_z_loss(out.router_logits), loss_scale=world
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        losses.append(logged.item() / world)
        history.append(sum_over_processes(monitor.snapshot(step=step + 1)))
        if before is not None:
            deltas = first_step_update(model, before)
    monitor.close()
    result = {
        "losses": losses,
        "router0": router_weight(model),
        "windows": windows(history),
        "groups": [
            {
                "role": g["role"],
                "lr": g["lr"],
                "params": len(g["params"]),
                "dtensors": all(hasattr(p, "full_tensor") for p in g["params"]),
            }
            for g in optimizer.param_groups
        ],
        "roles_before": roles_before,
        "roles_after": sorted(roles.values()),
        "first_step_max_update": deltas,
    }
    return result, {}


def main(argv=None) -> None:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result, mine = (run_fsdp if args.mode == "fsdp" else run_trainer)(args)
    rank = int(os.environ.get("RANK", "0"))
    result["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    write_bytes(args.out / f"rank{rank}.json", json.dumps(mine).encode())
    if rank == 0:
        write_bytes(args.out / "result.json", json.dumps(result).encode())
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every rank is done before any leaves; then leave without tearing anything down: with gloo, a rank exiting
        # while its peer still talks, and a process group's threads met by destructors at interpreter exit, both end
        # in std::terminate (SIGABRT; seen in ~3 of 15 CI runs, the second after a barrier and destroy_process_group).
        # The results are written (atomically) above, so nothing is lost by skipping the teardown.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
