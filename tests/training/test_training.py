"""moe_patch.training: the routing callback logs through a real Trainer, router / expert learning rates,
router losses, LoRA on fused experts, local data, and examples/train_upcycled.py end to end."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import moe_patch
from moe_patch import MoEConfigError, NoMoEFoundError
from moe_patch.testing.compare import rel_diff
from moe_patch.testing.legacy import legacy_moe_model
from moe_patch.testing.tiny import tiny_model
from moe_patch.training import (
    MoETrainer,
    RoutingCallback,
    TokenBlocks,
    enable_router_aux_loss,
    expert_lora_config,
    param_groups,
    parameter_roles,
    python_stdlib_files,
    router_z_loss,
    split_held_out,
    train_byte_bpe,
)

ROOT = Path(__file__).resolve().parents[2]


def blocks(n: int = 32, length: int = 16, vocab: int = 128) -> TokenBlocks:
    return TokenBlocks(torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0)))


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-3,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def mixtral(patched: bool = True):
    model, _ = tiny_model("mixtral")
    model.train()
    if patched:
        moe_patch.patch_model(model)
    return model


class Recorder(TrainerCallback):
    """Stands for a report_to integration: sees what Trainer.log hands every callback."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# -- RoutingCallback -------------------------------------------------------------------------------


def test_routing_callback_logs_through_a_real_trainer(tmp_path):
    data = blocks()
    recorder = Recorder()
    model = mixtral()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    trainer = Trainer(model=model, args=targs(tmp_path), train_dataset=data, callbacks=[recorder])
    routing = RoutingCallback(trainer, stability_inputs={"input_ids": data.blocks[:2]})
    trainer.add_callback(routing)
    trainer.train()
    history = trainer.state.log_history
    routed = [h for h in history if "routing/load_cv_max" in h]
    assert [h["step"] for h in routed] == [2, 4]
    assert [h["step"] for h in history if "loss" in h] == [2, 4]  # the Trainer's own logging still happens
    assert "routing/top1_changed_mean" in routed[1] and "routing/top1_changed_mean" not in routed[0]
    assert all(math.isfinite(v) for h in routed for k, v in h.items() if k.startswith("routing/"))
    assert any("routing/entropy_mean" in logs for logs in recorder.logs)  # integrations receive the figures
    # each window holds its own steps' tokens: 2 steps x 4 sequences x 16 tokens
    assert [r.tokens for r in routing.history] == [128, 128]
    assert routing.plot(tmp_path / "routing.png").stat().st_size > 0
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks  # removed


def test_routing_callback_every_n_steps_and_per_layer(tmp_path):
    trainer = Trainer(model=mixtral(), args=targs(tmp_path, max_steps=6), train_dataset=blocks())
    trainer.add_callback(RoutingCallback(trainer, every=3, per_layer=True))
    trainer.train()
    routed = [h for h in trainer.state.log_history if "routing/load_cv_max" in h]
    assert [h["step"] for h in routed] == [3, 6]
    assert "routing/layer1/load_cv" in routed[0]


def test_routing_callback_warns_on_an_unpatched_model(tmp_path, caplog):
    trainer = Trainer(model=mixtral(patched=False), args=targs(tmp_path, max_steps=2), train_dataset=blocks())
    trainer.add_callback(RoutingCallback(trainer))
    with caplog.at_level(logging.WARNING, logger="moe_patch.training.callback"):
        trainer.train()
    warning = [r.getMessage() for r in caplog.records if "not patched" in r.getMessage()]
    assert len(warning) == 1 and "patch_model(model)" in warning[0]
    assert any("routing/load_cv_max" in h for h in trainer.state.log_history)  # still logged


def test_routing_callback_bad_input(tmp_path):
    with pytest.raises(MoEConfigError, match="pass the Trainer"):
        RoutingCallback(object())
    trainer = Trainer(model=mixtral(), args=targs(tmp_path), train_dataset=blocks())
    with pytest.raises(MoEConfigError, match="every="):
        RoutingCallback(trainer, every=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    trainer = Trainer(model=dense, args=targs(tmp_path, max_steps=1), train_dataset=blocks())
    trainer.add_callback(RoutingCallback(trainer))
    with pytest.raises(NoMoEFoundError, match="no Mixture-of-Experts block"):
        trainer.train()


# -- MoETrainer: learning rates by role, z-loss ------------------------------------------------------


def test_router_and_expert_learning_rates_split_the_trainers_own_groups(tmp_path):
    model = mixtral()
    trainer = MoETrainer(
        model=model, args=targs(tmp_path, weight_decay=0.1), train_dataset=blocks(), router_lr=1e-2, expert_lr=1e-4
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    roles = parameter_roles(model)
    groups = trainer.optimizer.param_groups
    assert groups[0]["role"] == "other" and trainer.lr_scheduler.get_last_lr()[0] == 1e-3
    for g in groups:
        assert g["lr"] == {"other": 1e-3, "router": 1e-2, "experts": 1e-4}[g["role"]]
        assert all(roles.get(id(p), "other") == g["role"] for p in g["params"])
    assert {g["weight_decay"] for g in groups if g["role"] == "other"} == {0.0, 0.1}  # the Trainer's decay rule kept
    assigned = [id(p) for g in groups for p in g["params"]]
    assert sorted(assigned) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert sorted(trainer.lr_scheduler.base_lrs) == sorted(g["lr"] for g in groups)
    router = model.model.layers[0].mlp.gate.weight
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert roles[id(router)] == "router" and roles[id(experts)] == "experts"


def test_param_groups_for_a_custom_loop(tmp_path):
    model = mixtral()
    groups = param_groups(model, 1e-3, router_lr=5e-3)
    optimizer = torch.optim.AdamW(groups)
    assert [g["role"] for g in optimizer.param_groups] == ["other", "router", "experts"]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-3, 1e-3]
    with pytest.raises(MoEConfigError, match="router_lr"):
        param_groups(model, 1e-3, router_lr=-1)
    with pytest.raises(MoEConfigError, match="param_groups"):  # its own optimizer cannot be split by MoETrainer
        MoETrainer(model=model, args=targs(tmp_path), optimizers=(optimizer, None), router_lr=1e-2)


def test_router_z_loss_is_added_to_the_training_loss(tmp_path):
    model = mixtral()
    enable_router_aux_loss(model)
    batch = {"input_ids": blocks().blocks[:2], "labels": blocks().blocks[:2]}
    plain = MoETrainer(model=model, args=targs(tmp_path), train_dataset=blocks())
    with_z = MoETrainer(model=model, args=targs(tmp_path), train_dataset=blocks(), router_z_loss_coef=0.5)
    base, outputs = plain.compute_loss(model, dict(batch), return_outputs=True)
    total = with_z.compute_loss(model, dict(batch))
    z = router_z_loss(outputs.router_logits).detach()
    assert float((total - base).detach()) == pytest.approx(0.5 * float(z), rel=1e-5)
    model.eval()
    assert float(with_z.compute_loss(model, dict(batch))) == pytest.approx(float(base), rel=1e-6)  # eval: no z-loss


def test_router_z_loss_definition_and_bad_input(tmp_path):
    logits = torch.randn(5, 4)
    assert float(router_z_loss(logits)) == pytest.approx(float(torch.logsumexp(logits, -1).square().mean()))
    assert float(router_z_loss((logits, 2 * logits))) == pytest.approx(
        float((router_z_loss(logits) + router_z_loss(2 * logits)) / 2)
    )
    with pytest.raises(MoEConfigError, match="router_z_loss_coef"):
        MoETrainer(model=mixtral(), args=targs(tmp_path), train_dataset=blocks(), router_z_loss_coef=-1)
    model = mixtral()  # output_router_logits left off
    trainer = MoETrainer(model=model, args=targs(tmp_path), train_dataset=blocks(), router_z_loss_coef=0.1)
    batch = {"input_ids": blocks().blocks[:2], "labels": blocks().blocks[:2]}
    with pytest.raises(MoEConfigError, match="enable_router_aux_loss"):
        trainer.compute_loss(model, batch)


def test_enable_router_aux_loss_switches_on_the_models_own_loss():
    model = mixtral()
    batch = {"input_ids": blocks().blocks[:2], "labels": blocks().blocks[:2]}
    without = float(model(**batch).loss)
    assert enable_router_aux_loss(model, 0.25) == 0.25
    assert model.config.output_router_logits and model.router_aux_loss_coef == 0.25
    out = model(**batch)
    assert float(out.loss) == pytest.approx(without + 0.25 * float(out.aux_loss), rel=1e-5)
    with pytest.raises(MoEConfigError, match=">= 0"):
        enable_router_aux_loss(model, -0.1)


def test_enable_router_aux_loss_warns_when_the_config_has_no_router_loss_fields(caplog):
    model = legacy_moe_model("mixtral")
    with caplog.at_level(logging.WARNING, logger="moe_patch.training.losses"):
        assert enable_router_aux_loss(model, 0.01) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no output_router_logits" in messages[0] and "\n" not in messages[0]


# -- LoRA on the experts ------------------------------------------------------------------------------


def test_lora_on_fused_experts_is_exact_under_the_patch_and_trains_the_experts():
    from peft import get_peft_model

    model, inputs = tiny_model("mixtral")
    config = expert_lora_config(model, r=4, attention=True, init_lora_weights=False)
    assert sorted(config.target_parameters) == [
        f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("down_proj", "gate_up_proj")
    ]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(config.target_modules)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        reference = peft_model(**inputs).logits
    moe_patch.patch_model(peft_model)
    with torch.no_grad():
        assert rel_diff(peft_model(**inputs).logits, reference) < 1e-5
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    expert_factors = [p for n, p in peft_model.named_parameters() if "experts" in n and "lora_" in n]
    assert expert_factors and all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_factors)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_lora_targets_for_list_experts_and_refusals():
    legacy = legacy_moe_model("mixtral")
    config = expert_lora_config(legacy, r=2)
    assert "layers.0.block_sparse_moe.experts.3.w2" in config.target_modules and not config.target_parameters
    dbrx, _ = tiny_model("dbrx")
    with pytest.raises(MoEConfigError, match="attention=True"):
        expert_lora_config(dbrx)
    with pytest.raises(MoEConfigError, match="lora_dropout"):
        expert_lora_config(tiny_model("mixtral")[0], lora_dropout=0.1)


# -- data ----------------------------------------------------------------------------------------


def test_local_corpus_tokenizer_and_blocks():
    files = python_stdlib_files(limit=30)
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    train, held = split_held_out(files, share=0.2)
    assert set(train).isdisjoint(held) and sorted(train + held) == files
    assert split_held_out(files, share=0.2) == (train, held)  # the same split every time
    tokenizer = train_byte_bpe(train[:5], vocab_size=300)
    text = "def f(x):\n    return x + 1\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
    data = TokenBlocks.from_files(held, tokenizer, 16, max_tokens=160)
    assert data.blocks.shape == (10, 16) and torch.equal(data[3]["labels"], data[3]["input_ids"])
    with pytest.raises(MoEConfigError, match="fewer than one block"):
        TokenBlocks.from_files(held[:1], tokenizer, 10**7)


# -- the example, end to end ----------------------------------------------------------------------


def _example():
    spec = importlib.util.spec_from_file_location("train_upcycled", ROOT / "examples" / "train_upcycled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_RUN = [
    "--steps",
    "4",
    "--batch",
    "2",
    "--block",
    "32",
    "--corpus-files",
    "12",
    "--vocab",
    "300",
    "--hidden",
    "32",
    "--layers",
    "2",
    "--log-every",
    "2",
]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_upcycled_example_runs_end_to_end(tmp_path, lora):
    result = _example().main(TINY_RUN + ["--out", str(tmp_path)] + (["--lora"] if lora else []))
    assert math.isfinite(result["held_out_loss_before"]) and math.isfinite(result["held_out_loss_after"])
    assert result["router_aux_loss_coef"] == 0.01
    routed = [h for h in result["log_history"] if "routing/load_cv_max" in h]
    assert [h["step"] for h in routed] == [2, 4]
    assert (tmp_path / "routing.json").is_file() and (tmp_path / "routing.png").is_file()
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # a stock checkpoint again
    assert type(trained).__name__ == "MixtralForCausalLM" and not moe_patch.patch.is_patched(trained)
