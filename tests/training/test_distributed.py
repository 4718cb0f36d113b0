"""Continued training under several processes is the same training as in one process.

Runs tests/training/twin_train.py (an upcycled Mixtral, load-balancing loss 0.1, router z-loss 0.01, router /
expert learning rates) with the same global batch of 8 sequences at every step: one process with one batch of
8 (the reference), one process with 2 accumulated batches of 4, ``torchrun --nproc_per_node 2`` with the Trainer
(DDP on CPU, gloo) and with torch's ``fully_shard`` (FSDP2), and examples/train_upcycled.py under torchrun and
``accelerate launch``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_training import TINY_RUN  # the example's smallest run, as the one-process test runs it

ROOT = Path(__file__).resolve().parents[2]

#: Loss difference allowed against one batch of 8. The load-balancing loss is a statistic of the batch it is
#: computed on: a process (or micro-batch) of 4 sequences computes it on its 4, and the mean of two such values
#: differs from the value over all 8 (here by 5e-4 at coefficient 0.1). The fault these tests guard against,
#: the auxiliary term counted once per process or per micro-batch, moves the loss by coef * aux, about 0.2.
LOSS_TOL = 2e-3
#: Runs that split the batch the same way (2 x 4) compute the same thing, up to float summation order.
SAME_SPLIT_TOL = 1e-5
LR, ROUTER_LR, EXPERT_LR = 1e-3, 1e-2, 3e-4  # twin_train.py's defaults


def reference(twin):
    return twin("one-process", batch=8)[0]


def assert_same_curve(got: dict, ref: dict, tol: float) -> None:
    assert len(got["losses"]) == len(ref["losses"]) == 4
    assert got["losses"] == pytest.approx(ref["losses"], abs=tol)


def test_gradient_accumulation_weighs_the_router_losses_as_one_batch(twin):
    accumulated = twin("accumulated", batch=4, accum=2)[0]
    assert_same_curve(accumulated, reference(twin), LOSS_TOL)


def test_ddp_two_processes_train_like_one(twin):
    ddp, _ = twin("ddp", procs=2, batch=4)
    assert ddp["world_size"] == 2
    assert_same_curve(ddp, reference(twin), LOSS_TOL)
    assert_same_curve(ddp, twin("accumulated", batch=4, accum=2)[0], SAME_SPLIT_TOL)
    assert ddp["router0"] == pytest.approx(twin("accumulated", batch=4, accum=2)[0]["router0"], abs=1e-5)
    # AdamW's first step moves every element with a gradient by its group's learning rate
    assert ddp["first_step_max_update"] == pytest.approx(
        {"other": LR, "router": ROUTER_LR, "experts": EXPERT_LR}, rel=1e-3
    )


def test_routing_callback_counts_every_process_and_logs_its_figures_once(twin):
    ddp, ranks = twin("ddp", procs=2, batch=4)
    ref = reference(twin)
    # each logged window holds the whole global batch: 8 sequences x 16 tokens per layer, not one process's half
    assert [w["tokens"] for w in ddp["windows"]] == [[128, 128]] * 4
    assert ddp["windows"][0]["load"] == ref["windows"][0]["load"]  # same weights, same tokens: the same routing
    assert ranks[0]["routing"] == ranks[1]["routing"] and len(ranks[0]["routing"]) == 4  # the same global figures
    assert [r["on_log_with_routing"] for r in ranks] == [4, 4]  # one log per step in each process, not more
    assert [r["world_process_zero"] for r in ranks] == [True, False]  # integrations write from process 0 only


def test_fsdp_full_shard_trains_like_one_process_and_keeps_the_learning_rate_groups(twin):
    fsdp, _ = twin("fsdp", procs=2, batch=4, mode="fsdp")
    assert_same_curve(fsdp, reference(twin), LOSS_TOL)
    assert_same_curve(fsdp, twin("ddp", procs=2, batch=4)[0], SAME_SPLIT_TOL)
    assert fsdp["router0"] == pytest.approx(twin("ddp", procs=2, batch=4)[0]["router0"], abs=1e-5)
    # groups built after fully_shard hold the sharded parameters, each role with its own rate
    assert fsdp["roles_after"] == fsdp["roles_before"]
    assert [(g["role"], g["lr"], g["dtensors"]) for g in fsdp["groups"]] == [
        ("other", LR, True),
        ("router", ROUTER_LR, True),
        ("experts", EXPERT_LR, True),
    ]
    assert fsdp["first_step_max_update"] == pytest.approx(
        {"other": LR, "router": ROUTER_LR, "experts": EXPERT_LR}, rel=1e-3
    )
    assert [w["tokens"] for w in fsdp["windows"]] == [[128, 128]] * 4  # sum_over_processes outside a Trainer


def test_router_losses_are_per_batch_means_under_accumulation(tmp_path):
    """In one process with 2 accumulation steps, MoETrainer's loss for one micro-batch is the cross-entropy over the
    accumulated tokens plus half of each router term (transformers adds the whole auxiliary term to every
    micro-batch's loss, which counts it twice per step)."""
    from transformers import TrainingArguments

    from moe_patch.testing.tiny import tiny_model
    from moe_patch.training import MoETrainer, TokenBlocks, enable_router_aux_loss, router_z_loss

    model, _ = tiny_model("mixtral")
    model.train()
    enable_router_aux_loss(model, 0.1)
    data = TokenBlocks(torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(0)))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=data, router_z_loss_coef=0.01)
    trainer.current_gradient_accumulation_steps = 2
    batch = {"input_ids": data.blocks[:4], "labels": data.blocks[:4]}
    items = torch.tensor(2 * 4 * 15)  # predicted tokens of both micro-batches
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    out = model(**batch, num_items_in_batch=items)
    cross_entropy = out.loss - 0.1 * out.aux_loss
    expected = cross_entropy + (0.1 * out.aux_loss + 0.01 * router_z_loss(out.router_logits)) / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_train_upcycled_example_on_two_processes(tmp_path, launch_script, launcher):
    launch_script(
        ROOT / "examples" / "train_upcycled.py",
        [*TINY_RUN, "--out", str(tmp_path)],
        procs=2,
        launcher=launcher,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["processes"] == 2 and result["global_batch"] == 4
    routed = [h for h in result["log_history"] if "routing/load_cv_max" in h]
    assert [h["step"] for h in routed] == [2, 4]
    routing = json.loads((tmp_path / "routing.json").read_text())
    assert [layer["counts"]["tokens"] for layer in routing["layers"]] == [4 * 4 * 32] * 2  # every process's tokens
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "model")).__name__ == "MixtralForCausalLM"


def test_building_blocks_outside_a_process_group():
    """weigh_router_losses is the arithmetic the Trainer's scaling needs; sum_over_processes is the identity
    without a process group (one process: its counts are the whole batch's)."""
    import moe_patch
    from moe_patch.testing.tiny import tiny_model
    from moe_patch.training import sum_over_processes, weigh_router_losses

    loss, aux, z = torch.tensor(8.0), torch.tensor(0.5), torch.tensor(0.25)
    # 4 processes, 2 accumulation steps: 4 x (CE + aux) becomes 4 x CE + (aux + z) / 2
    got = weigh_router_losses(4 * (loss + aux), aux_term=aux, z_term=z, loss_scale=4, batch_weight=0.5)
    assert float(got) == pytest.approx(4 * 8.0 + (0.5 + 0.25) / 2)
    model, inputs = tiny_model("mixtral")
    with moe_patch.monitor(model) as monitor:
        model(**inputs)
    report = monitor.report()
    assert sum_over_processes(report) is report
