"""Dense -> MoE upcycling: plan (configs and headers only), then stream the weights, verify, report.

``plan_upcycle`` decides everything (target config, every output tensor with its shape, dtype and
shard, parameter counts, predicted peak memory) without reading a weight; ``--dry-run`` prints it.
``upcycle`` executes the plan: one tensor at a time, computed from slices of the source and written
straight into its shard inside a temporary folder that replaces OUT only when everything, including
the verification, succeeded.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_patch.atomic import atomic_dir
from moe_patch.errors import MoEConfigError, MoEPatchError, OutputError
from moe_patch.sizes import format_bytes, parse_size

from .checkpoint import DenseCheckpoint
from .recipes import (
    DOWN,
    ExpertLayout,
    add_noise,
    drop_mask,
    expand_router,
    random_router_rows,
    reinit_neurons,
    seeded_generator,
)
from .sources import WeightSource, mlp_key
from .targets import (
    Target,
    build_target_config,
    check_source_config,
    engine_warnings,
    moe_layer_indices,
    resolve_target,
)
from .verify import EXACT_TOLERANCE, Verification, verify_folders
from .writer import ShardWriter, TensorSpec, plan_shards

logger = logging.getLogger(__name__)

REPORT_NAME = "upcycle_report.json"
#: What a real run holds beyond the dry run's baseline and the largest working set (allocator arenas,
#: writer and progress bar); measured 16-24 MiB on the 2-core CPU machine (bench/upcycle.py).
RUN_OVERHEAD_BYTES = 16 * 2**20
#: Tensors copied unchanged are streamed in row blocks of about this size (bounds memory for huge embeddings).
COPY_BLOCK_BYTES = 64 * 2**20
ROUTER_INITS = ("zero", "random", "kmeans", "pca")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
#: Files copied from SRC unchanged (tokenizer and generation defaults); never weights or pickles.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class UpcycleConfig:
    """What to build. ``num_experts``/``top_k`` count routed experts of the output (config.num_experts)."""

    num_experts: int | None = None  #: routed experts per MoE layer; derived from the sources for BTX/LoRA
    top_k: int = 2
    target: str = "auto"
    granularity: int = 1  #: G: slices per dense FFN (fine-grained experts when > 1)
    shared_experts: int = 0  #: S: slices that form the (Qwen2-MoE) shared expert
    moe_layers: str | Sequence[int] = "all"  #: all, every-N, or layer indices
    router_init: str = "random"  #: zero | random | kmeans | pca
    router_std: float | None = None  #: std of the random router (default: config.initializer_range)
    calibration: str | Path | None = None  #: text or token-id file for kmeans/pca
    calibration_format: str = "auto"
    calibration_tokens: int = 4096
    drop_ratio: float = 0.0  #: drop-upcycling: fraction of each expert's neurons re-initialised
    noise: float = 0.0  #: Gaussian noise, std relative to each dense tensor's std
    experts_from: Sequence[str | Path] = ()  #: Branch-Train-MiX: one fine-tune per expert copy
    lora_experts: Sequence[str | Path] = ()  #: one peft LoRA adapter per expert copy
    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    seed: int = 0
    verify: bool = True
    verify_tolerance: float = EXACT_TOLERANCE
    overwrite: bool = False
    argv: Sequence[str] | None = None  #: recorded in the report; default: the equivalent CLI command


#: UpcycleConfig fields by the type they must hold (the CLI's argparse types guarantee it; the library API is
#: checked by :func:`check_config`: ``top_k="two"`` or ``top_k=2.5`` is a one-line error, never a ValueError or a
#: truncation).
_INTEGER_FIELDS = ("num_experts", "top_k", "granularity", "shared_experts", "calibration_tokens", "seed")
_NUMBER_FIELDS = ("router_std", "drop_ratio", "noise", "verify_tolerance")
_TEXT_FIELDS = ("target", "router_init", "calibration_format")
_PATH_LIST_FIELDS = ("experts_from", "lora_experts")
_OPTIONAL_FIELDS = ("num_experts", "router_std", "calibration", "argv")


def _flag(name: str) -> str:
    return name if name in ("verify", "overwrite", "verify_tolerance", "argv") else "--" + name.replace("_", "-")


def check_config(config: UpcycleConfig) -> None:
    """Refuse, with one :class:`MoEConfigError` naming the option, a field of a type the conversion cannot use."""
    if not isinstance(config, UpcycleConfig):
        raise MoEConfigError(f"expected an UpcycleConfig, got {type(config).__name__}")

    def bad(name: str, expected: str) -> MoEConfigError:
        return MoEConfigError(f"{_flag(name)} {getattr(config, name)!r}: expected {expected}.")

    for name in _INTEGER_FIELDS:
        value = getattr(config, name)
        if not (value is None and name in _OPTIONAL_FIELDS) and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral)
        ):
            raise bad(name, "an integer")
    for name in _NUMBER_FIELDS:
        value = getattr(config, name)
        if not (value is None and name in _OPTIONAL_FIELDS) and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)
        ):
            raise bad(name, "a number")
    for name in _TEXT_FIELDS:
        if not isinstance(getattr(config, name), str):
            raise bad(name, "text")
    for name in ("verify", "overwrite"):
        if not isinstance(getattr(config, name), bool):
            raise bad(name, "True or False")
    if not isinstance(config.dtype, str):
        raise bad("dtype", f"one of auto, {', '.join(DTYPES)}")
    layers = config.moe_layers
    if not isinstance(layers, str) and not (
        isinstance(layers, (list, tuple, range))
        and layers
        and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers)
    ):
        raise bad("moe_layers", "layer indices (integers), 'all', 'every-N' or a comma-separated list of indices")
    for name in _PATH_LIST_FIELDS:
        value = getattr(config, name)
        if (
            isinstance(value, (str, bytes, os.PathLike))
            or not isinstance(value, (list, tuple))
            or not all(isinstance(p, (str, os.PathLike)) for p in value)
        ):
            raise bad(name, "a list of model folders (one per expert copy)")
    if config.calibration is not None and not isinstance(config.calibration, (str, os.PathLike)):
        raise bad("calibration", "a file path")
    if isinstance(config.max_shard_size, bool) or not isinstance(config.max_shard_size, (str, numbers.Integral)):
        raise bad("max_shard_size", "a size such as 5GB or a number of bytes")
    if config.argv is not None and (isinstance(config.argv, str) or not all(isinstance(a, str) for a in config.argv)):
        raise bad("argv", "a list of strings")
    if not (math.isfinite(config.verify_tolerance) and config.verify_tolerance >= 0):
        raise bad("verify_tolerance", "a finite, non-negative relative difference")


@dataclass
class PlannedTensor:
    spec: TensorSpec
    #: returns the tensor, or an iterator over its row blocks (large tensors copied unchanged)
    make: Callable[[], torch.Tensor | Iterator[torch.Tensor]]
    #: bytes of working memory beyond the process baseline while this tensor is built (for the RSS forecast)
    work_bytes: int


@dataclass
class UpcyclePlan:
    """Everything the conversion will do, decided from configs and safetensors headers only."""

    source: Path
    source_type: str
    target: Target
    layout: ExpertLayout
    moe_layers: list[int]
    target_config: dict[str, Any]
    out_dtype: torch.dtype
    tensors: list[PlannedTensor]
    shards: list[list[TensorSpec]]
    total_params: int
    active_params: int
    exact: bool
    inexact_reasons: list[str]
    predicted_peak_rss: int  #: conversion only (no --verify, no data router init)
    predicted_verify_rss: int
    baseline_rss: int
    config: UpcycleConfig
    weights: WeightSource
    router_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    #: inference engines that will not serve the output, and why (logged as warnings when planned)
    engine_warnings: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for shard in self.shards for s in shard)

    def summary(self) -> str:
        lay, c = self.layout, self.config
        n_layers, dtype = self.target_config["num_hidden_layers"], str(self.out_dtype).replace("torch.", "")
        lines = [
            f"upcycle {self.source} ({self.source_type}) -> {self.target.architecture}",
            (
                f"  experts: {lay.num_experts} routed (top-{lay.top_k}) = {lay.copies} copies x {lay.routed_slices} "
                f"slices of {lay.slice_width} neurons; shared expert: {lay.shared_width} neurons; alpha={lay.alpha:g}"
            ),
            f"  MoE layers: {_ranges(self.moe_layers)} ({len(self.moe_layers)} of {n_layers})",
            f"  router init: {c.router_init}; drop_ratio={c.drop_ratio}; noise={c.noise}; seed={c.seed}",
            f"  exact at init: {'yes' if self.exact else 'no (' + '; '.join(self.inexact_reasons) + ')'}",
            f"  tensors: {len(self.tensors)} in {len(self.shards)} shard(s); dtype {dtype}",
            f"  parameters: total {self.total_params:,}, active per token {self.active_params:,}",
            f"  output size: {format_bytes(self.output_bytes)} ({self.output_bytes:,} bytes of tensors)",
            f"  predicted peak RSS: conversion {format_bytes(self.predicted_peak_rss)}"
            + (f"; with --verify {format_bytes(self.predicted_verify_rss)}" if c.verify else " (--no-verify)"),
            *(f"  engines: {w}" for w in self.engine_warnings),
        ]
        return "\n".join(lines + ["  tensor groups (name pattern, shape, dtype, count):", *self._tensor_groups()])

    def _tensor_groups(self) -> list[str]:
        groups: dict[tuple[str, tuple[int, ...], torch.dtype], int] = {}
        for t in self.tensors:
            pattern = re.sub(r"\.\d+\.", ".*.", t.spec.name)
            key = (pattern, t.spec.shape, t.spec.dtype)
            groups[key] = groups.get(key, 0) + 1
        return [
            f"    {name} {list(shape)} {str(dtype).replace('torch.', '')} x{n}"
            for (name, shape, dtype), n in groups.items()
        ]


@dataclass
class UpcycleReport:
    """What was built, written to ``OUT/upcycle_report.json`` (the Hub model card reads these keys)."""

    source: dict[str, Any]
    target: dict[str, Any]
    recipe: dict[str, Any]
    argv: list[str]
    command_line: str
    total_params: int
    active_params: int
    verification: dict[str, Any] | None
    output: dict[str, Any]
    notes: list[str]
    #: measured, not written to the JSON file (keeps same-input reports byte-identical)
    wall_s: float = 0.0
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("wall_s")
        d.pop("peak_rss_bytes")
        return {"format": "moe-patch-upcycle-report", "version": 1, **d}

    def __str__(self) -> str:
        v = self.verification
        check = (
            f"max |dlogit| {v['max_abs_logit_diff']:.3g} (rel {v['rel_diff']:.3g}), greedy agreement "
            f"{v['greedy_token_agreement']:.3f} over {v['greedy_tokens_compared']} tokens"
            if v
            else "not verified"
        )
        return (
            f"{self.target['architecture']} written to {self.output['path']}: {self.recipe['num_experts']} experts "
            f"top-{self.recipe['top_k']}, {self.total_params:,} params ({self.active_params:,} active), "
            f"exact={self.recipe['exact']}; {check}"
        )


def _ranges(xs: list[int]) -> str:
    return "[" + ",".join(map(str, xs)) + "]" if len(xs) < 12 else f"[{xs[0]}..{xs[-1]}]"


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _out_dtype(name: str, ckpt: DenseCheckpoint) -> torch.dtype:
    if name in (None, "", "auto"):
        return ckpt.floating_dtype
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise MoEConfigError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}.") from None


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.log2(x).is_integer()


def plan_upcycle(src: str | Path, config: UpcycleConfig) -> UpcyclePlan:
    """Decide the whole conversion from configs and headers. The caller must ``plan.weights.close()``."""
    check_config(config)
    src = Path(src)
    if config.experts_from and config.lora_experts:
        raise MoEConfigError("--experts-from and --lora-experts are alternatives; give one of them.")
    base = DenseCheckpoint(src)
    weights = WeightSource(base, [Path(p) for p in config.experts_from], [Path(p) for p in config.lora_experts])
    try:
        return _plan(src, config, weights)
    except BaseException:
        weights.close()
        raise


def _plan(src: Path, config: UpcycleConfig, weights: WeightSource) -> UpcyclePlan:
    base = weights.base
    scfg = base.config
    source_type = scfg["model_type"]
    target = resolve_target(source_type, config.target)
    check_source_config(scfg, target)
    if config.router_init not in ROUTER_INITS:
        raise MoEConfigError(f"--router-init {config.router_init!r}: expected one of {', '.join(ROUTER_INITS)}.")
    if config.router_init in ("kmeans", "pca") and not config.calibration:
        raise MoEConfigError(f"--router-init {config.router_init} needs --calibration FILE (text or token ids).")
    if not 0 <= config.drop_ratio <= 1:
        raise MoEConfigError(f"--drop-ratio {config.drop_ratio}: expected a fraction in [0, 1].")
    if config.router_init in ("kmeans", "pca") and config.calibration_tokens < 1:
        raise MoEConfigError(f"--calibration-tokens {config.calibration_tokens}: expected a positive count.")
    if not (math.isfinite(config.noise) and config.noise >= 0):
        raise MoEConfigError(f"--noise {config.noise}: expected a finite, non-negative relative std.")
    if config.router_std is not None and not (math.isfinite(config.router_std) and config.router_std > 0):
        raise MoEConfigError(f"--router-std {config.router_std}: expected a finite std > 0.")

    H, F, L = int(scfg["hidden_size"]), int(scfg["intermediate_size"]), int(scfg["num_hidden_layers"])
    G, S = int(config.granularity), int(config.shared_experts)
    copies = weights.copies
    R = G - S
    if copies is not None:
        if S:
            raise MoEConfigError(
                "--shared-experts cannot be combined with --experts-from/--lora-experts (whose FFN would it be?)."
            )
        E = copies * R
        if config.num_experts not in (None, E):
            raise MoEConfigError(
                f"--num-experts {config.num_experts}: {copies} expert sources x {R} slices give {E} experts; "
                "omit --num-experts or make them agree."
            )
    else:
        if config.num_experts is None:
            raise MoEConfigError("--num-experts is required (routed experts per MoE layer in the output).")
        E = int(config.num_experts)
    layout = ExpertLayout(F, E, int(config.top_k), G, S)
    if S and not target.gated_shared_expert:
        raise MoEConfigError(
            f"--shared-experts {S}: {target.architecture} has no shared expert; shared experts need a Qwen2 source "
            "(target qwen2_moe)."
        )
    moe_layers = moe_layer_indices(config.moe_layers, L)
    out_dtype = _out_dtype(config.dtype, base)
    tcfg = build_target_config(
        scfg,
        target,
        num_experts=E,
        top_k=layout.top_k,
        expert_width=layout.slice_width,
        shared_width=layout.shared_width,
        moe_layers=moe_layers,
        dtype=str(out_dtype).replace("torch.", ""),
    )
    _validate_target_config(tcfg)
    engines = engine_warnings(target, tcfg)
    for warning in engines:
        logger.warning("%s", warning)

    reasons = _inexact_reasons(config, layout, base, out_dtype, weights)
    plan = UpcyclePlan(
        source=src,
        source_type=source_type,
        target=target,
        layout=layout,
        moe_layers=moe_layers,
        target_config=tcfg,
        out_dtype=out_dtype,
        tensors=[],
        shards=[],
        total_params=0,
        active_params=0,
        exact=not reasons,
        inexact_reasons=reasons,
        predicted_peak_rss=0,
        predicted_verify_rss=0,
        baseline_rss=_current_rss(),
        config=config,
        weights=weights,
        engine_warnings=engines,
    )
    _plan_tensors(plan)
    specs = [t.spec for t in plan.tensors]
    plan.shards = plan_shards(specs, parse_size(config.max_shard_size, name="--max-shard-size", minimum=1))
    plan.total_params = sum(s.numel for s in specs)
    expert_params = 3 * layout.slice_width * H
    plan.active_params = plan.total_params - len(moe_layers) * (E - layout.top_k) * expert_params
    working = max(t.work_bytes for t in plan.tensors)
    dense_fp32 = sum(4 * math.prod(i.shape) for i in base.tensors.values())
    if config.router_init in ("kmeans", "pca"):  # the dense model runs on the calibration tokens first
        working = max(working, dense_fp32 + _model_import_overhead())
    plan.predicted_peak_rss = plan.baseline_rss + working + RUN_OVERHEAD_BYTES
    # verification holds both models in fp32 (transformers stacks each layer's experts at load)
    plan.predicted_verify_rss = plan.baseline_rss + dense_fp32 + 4 * plan.total_params + _model_import_overhead()
    return plan


def _model_import_overhead() -> int:
    # importing the modeling code and running a forward adds about this much on top of the weights
    return 150 * 2**20


def _validate_target_config(tcfg: dict[str, Any]) -> None:
    from transformers import AutoConfig

    from moe_patch.detect.config import validate_moe_config

    validate_moe_config(tcfg)  # the checks every entry point that reads a config runs
    try:
        AutoConfig.for_model(**tcfg)
    except Exception as exc:
        raise MoEConfigError(
            f"the {tcfg['model_type']} config built from SRC is invalid ({type(exc).__name__}: {exc})."
        ) from None


def _inexact_reasons(
    config: UpcycleConfig, layout: ExpertLayout, base: DenseCheckpoint, out_dtype: torch.dtype, weights: WeightSource
) -> list[str]:
    reasons = []
    if config.drop_ratio > 0:
        reasons.append(f"drop-upcycling re-initialises {config.drop_ratio:.0%} of each expert's neurons")
    if config.noise > 0:
        reasons.append(f"Gaussian noise (relative std {config.noise}) added to expert weights")
    if config.experts_from:
        reasons.append("Branch-Train-MiX: experts come from different fine-tunes, other weights are averaged")
    if config.lora_experts:
        reasons.append("LoRA experts: each expert carries its own adapter update")
    if config.router_init == "zero" and layout.routed_slices > 1:
        reasons.append(
            "zero router with granularity > 1: every router logit ties and torch.topk does not keep "
            "fine-grained groups together; use --router-init random or a data init"
        )
    src_dtype = base.floating_dtype
    # Lossless only to the same dtype or a wider one that holds every value: bf16 -> fp16 has the same
    # bits and a smaller eps but a narrower range (subnormals below 6e-5, overflow above 65504).
    widening = (
        out_dtype == src_dtype
        or out_dtype in (torch.float32, torch.float64)
        and (torch.finfo(out_dtype).bits >= torch.finfo(src_dtype).bits)
    )
    if out_dtype != src_dtype and not widening:
        reasons.append(f"weights rounded from {src_dtype} to {out_dtype}")
    elif torch.finfo(out_dtype).bits < 32 and not _is_power_of_two(layout.alpha):
        reasons.append(f"down_proj x {layout.alpha:g} rounds in {out_dtype} (alpha is not a power of two)")
    return reasons


def _plan_tensors(plan: UpcyclePlan) -> None:
    w, lay, t, cfg = plan.weights, plan.layout, plan.target, plan.config
    base = w.base
    H = int(base.config["hidden_size"])
    odt = plan.out_dtype
    osize = torch.empty((), dtype=odt).element_size()
    moe = set(plan.moe_layers)
    stats: dict[tuple[int, int | None, int], tuple[float, float]] = {}
    F = lay.ffn_width
    n_src = max(len(w.models), 1)

    def add(
        name: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor], work: int, dtype: torch.dtype = odt
    ) -> None:
        plan.tensors.append(PlannedTensor(TensorSpec(name, tuple(shape), dtype), make, work))

    def passthrough(key: str) -> None:
        info = base.info(key)
        dtype = odt if info.dtype.is_floating_point else info.dtype  # --dtype never casts integer buffers
        numel = math.prod(info.shape)
        nbytes = numel * info.dtype.itemsize
        same = info.dtype == dtype and not w.averaged
        if same and nbytes > COPY_BLOCK_BYTES and len(info.shape) >= 1:
            # copied unchanged (embeddings, lm_head): stream row blocks, never the whole tensor
            step = max(1, COPY_BLOCK_BYTES * info.shape[0] // nbytes)
            rows = info.shape[0]

            def blocks() -> Iterator[torch.Tensor]:
                return (base.read(key, rows=slice(i, i + step)) for i in range(0, rows, step))

            add(key, info.shape, blocks, step * (nbytes // rows), dtype)
            return
        work = nbytes if same else nbytes * n_src + 8 * numel + numel * dtype.itemsize
        add(key, info.shape, lambda: w.shared(key).to(dtype), work, dtype)

    def stat(layer: int, copy: int | None, proj: int) -> tuple[float, float]:
        k = (layer, copy, proj)
        if k not in stats:
            stats[k] = w.ffn_stats(layer, copy, proj, F)
        return stats[k]

    last_read: dict[tuple[int, int | None, int, int], torch.Tensor] = {}

    def read_slice(layer: int, src_copy: int | None, proj: int, s: int) -> torch.Tensor:
        # one-entry memo: consecutive experts that copy the same slice share one read (never mutated)
        key = (layer, src_copy, proj, s)
        if key not in last_read:
            last_read.clear()
            last_read[key] = w.ffn(layer, src_copy, proj, lay.neurons(s))
        return last_read[key]

    def expert(layer: int, e: int, proj: int) -> torch.Tensor:
        copy, s = lay.expert(e)
        src_copy = copy if w.copies else None
        neurons = lay.neurons(s)
        x = read_slice(layer, src_copy, proj, s)
        if cfg.drop_ratio > 0 or cfg.noise > 0:
            x = x.float()
            mean, std = stat(layer, src_copy, proj)
            if cfg.drop_ratio > 0:
                mask = drop_mask(F, cfg.drop_ratio, cfg.seed, layer, copy)[neurons]
                gen = seeded_generator(cfg.seed, "drop-init", layer, e, proj)
                x = reinit_neurons(x, mask, mean, std, neuron_dim=1 if proj == DOWN else 0, gen=gen)
            if cfg.noise > 0:
                x = add_noise(x, cfg.noise, std, seeded_generator(cfg.seed, "noise", layer, e, proj))
        return scale_and_cast(x, lay.alpha if proj == DOWN else 1.0, odt)

    def router(layer: int) -> torch.Tensor:
        if cfg.router_init == "zero":
            rows = torch.zeros(lay.copies, H)
        elif cfg.router_init == "random":
            std = cfg.router_std if cfg.router_std is not None else float(base.config.get("initializer_range", 0.02))
            rows = random_router_rows(lay.copies, H, std, cfg.seed, layer)
        else:
            rows = plan.router_rows[layer]
        return expand_router(rows, lay.routed_slices).to(odt)

    def shared_proj(layer: int, proj: int) -> torch.Tensor:
        x = w.ffn(layer, None, proj, lay.shared_neurons)
        # x2 on down_proj: the zero shared_expert_gate multiplies the shared expert by sigmoid(0) = 1/2
        return scale_and_cast(x, 2.0 if proj == DOWN else 1.0, odt)

    slice_elems = lay.slice_width * H
    stat_work = (8 * F * H + 2 * F * H) if (cfg.drop_ratio > 0 or cfg.noise > 0) else 0
    src_size = base.info(mlp_key(plan.moe_layers[0], 0)).dtype.itemsize
    diverse = cfg.drop_ratio > 0 or cfg.noise > 0 or bool(w.adapters)
    expert_work = slice_elems * (src_size + (12 if diverse else 0) + osize) + stat_work
    done_layers: set[int] = set()
    keys = sorted(base.tensors, key=_natural_key)
    for key in keys:
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", key)
        if m is None or int(m.group(1)) not in moe:
            passthrough(key)
            continue
        layer = int(m.group(1))
        if layer in done_layers:
            continue
        done_layers.add(layer)
        add(t.router_key(layer), (lay.num_experts, H), lambda layer=layer: router(layer), lay.num_experts * H * 8)
        # copies of the same slice are written one after the other, so each source slice is read once
        for p in range(3):
            shape = (H, lay.slice_width) if p == DOWN else (lay.slice_width, H)
            for j in range(lay.routed_slices):
                for n in range(lay.copies):
                    e = n * lay.routed_slices + j
                    add(
                        t.expert_key(layer, e, p), shape, lambda layer=layer, e=e, p=p: expert(layer, e, p), expert_work
                    )
        if t.gated_shared_expert:
            sw = lay.shared_width
            for p in range(3):
                shape = (H, sw) if p == DOWN else (sw, H)
                add(t.shared_key(layer, p), shape, lambda layer=layer, p=p: shared_proj(layer, p), sw * H * 16)
            add(t.shared_gate_key(layer), (1, H), lambda: torch.zeros(1, H, dtype=odt), H * 8)


def scale_and_cast(x: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """``alpha * x`` in ``dtype`` with one rounding: scale in the more precise of the two dtypes."""
    if alpha == 1.0:
        return x.to(dtype)
    if torch.finfo(x.dtype).bits >= torch.finfo(dtype).bits:
        return (x * alpha).to(dtype)
    return x.to(dtype) * alpha


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _write_config(plan: UpcyclePlan, out: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(**plan.target_config).save_pretrained(out)


def _check_out_apart(out: Path, inputs: list) -> None:
    """OUT is replaced wholesale with --overwrite: it must not be, contain or lie inside any input."""
    o = out.resolve()
    for i in inputs:
        p = Path(i).resolve()
        if o == p or o in p.parents or p in o.parents:
            raise MoEConfigError(f"OUT {out} must not be, contain or lie inside the input {i}.")


def upcycle(src: str | Path, out: str | Path, config: UpcycleConfig | None = None, **kwargs: Any) -> UpcycleReport:
    """Upcycle the dense checkpoint in ``src`` into an MoE checkpoint in ``out``.

    ``out`` appears only when everything succeeded (written to a temporary folder next to it, then
    renamed); an existing ``out`` is replaced only with ``overwrite=True``. With ``verify`` (default)
    the result is loaded with plain ``AutoModelForCausalLM`` and compared with the dense model; an
    exact recipe that does not match within ``verify_tolerance`` raises and leaves no output.

    Example::

        report = upcycle("llama-1b", "llama-1b-8x", UpcycleConfig(num_experts=8, top_k=2))
    """
    if config is not None and kwargs:
        raise TypeError("pass either an UpcycleConfig or keyword arguments, not both")
    config = config or UpcycleConfig(**kwargs)
    check_config(config)
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    _check_out_apart(
        out, [src, *config.experts_from, *config.lora_experts, *([config.calibration] if config.calibration else [])]
    )
    if out.exists() and not config.overwrite:  # fail before any work (atomic_output_dir checks again)
        raise OutputError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it.")
    plan = plan_upcycle(src, config)
    with plan.weights:
        if config.router_init in ("kmeans", "pca"):
            _data_router(plan)
        with atomic_dir(out, replace=config.overwrite, needed_bytes=plan.output_bytes) as tmp:
            writer = ShardWriter(tmp, plan.shards)
            try:
                from tqdm.auto import tqdm

                # no bar on a stderr that is not a terminal (None): a log would keep every redraw, and an error
                # after the bar started would not be the one line the CLI promises
                for t in tqdm(
                    plan.tensors,
                    desc="upcycle",
                    unit="tensor",
                    disable=None if logger.isEnabledFor(logging.INFO) else True,
                ):
                    writer.write(t.spec.name, t.make())
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            _write_config(plan, tmp)
            files += ["config.json"] + _copy_side_files(src, tmp)
            peak = _peak_rss()
            verification = None
            if config.verify:
                verification = verify_folders(src, tmp, seed=config.seed, tolerance=config.verify_tolerance)
                if plan.exact and not verification.passed:
                    measured = (
                        f"max |dlogit| {verification.max_abs_logit_diff:.3g} (relative "
                        f"{verification.rel_diff:.3g} > {config.verify_tolerance:g}), greedy agreement "
                        f"{verification.greedy_token_agreement:.3f}"
                    )
                    why = (
                        "; ".join(verification.causes)
                        if verification.causes
                        else "no known cause: please report this with the source config.json"
                    )
                    raise VerificationError(
                        f"the upcycled model differs from {src} ({measured}): {why}. Nothing was written."
                    )
            report = _report(plan, out, files, verification)
            report.peak_rss_bytes = peak
            (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    report.wall_s = time.perf_counter() - t0
    logger.debug("%s", report)
    return report


class VerificationError(MoEPatchError):
    """An exact recipe produced a model that does not match its dense source."""


def _data_router(plan: UpcyclePlan) -> None:
    from .calibration import (
        collect_router_inputs,
        data_router_rows,
        load_calibration_ids,
    )

    c = plan.config
    ids = load_calibration_ids(
        c.calibration, plan.source, vocab_size=int(plan.weights.base.config["vocab_size"]), fmt=c.calibration_format
    )
    inputs = collect_router_inputs(plan.source, ids, plan.moe_layers, max_tokens=c.calibration_tokens)
    plan.router_rows = data_router_rows(c.router_init, inputs, plan.layout.copies, c.seed)


def reproduce_argv(src: str | Path, out: str | Path, c: UpcycleConfig) -> list[str]:
    """The ``moe-patch upcycle`` command line that rebuilds this output (non-default options only)."""
    argv = ["moe-patch", "upcycle", str(src), str(out)]
    if c.num_experts is not None:
        argv += ["--num-experts", str(c.num_experts)]
    argv += ["--top-k", str(c.top_k)]
    defaults = UpcycleConfig()
    for name in (
        "target",
        "granularity",
        "shared_experts",
        "moe_layers",
        "router_init",
        "router_std",
        "calibration",
        "calibration_format",
        "calibration_tokens",
        "drop_ratio",
        "noise",
        "experts_from",
        "lora_experts",
        "dtype",
        "max_shard_size",
        "seed",
    ):
        value = getattr(c, name)
        if value is None or value == getattr(defaults, name) or (isinstance(value, (list, tuple)) and not value):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "moe_layers" and not isinstance(value, str):
            argv += [flag, ",".join(map(str, value))]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    if not c.verify:
        argv.append("--no-verify")
    return argv  # --overwrite is left out: it does not change the result


def _notes(plan: UpcyclePlan) -> list[str]:
    notes = [f"not exact at init: {r}" for r in plan.inexact_reasons] + list(plan.engine_warnings)
    if plan.layout.routed_slices > 1 and plan.config.router_init != "zero":
        # measured: bf16 router logits of 8-64 copies tie at the top-k boundary for 0.4-4% of tokens per layer
        notes.append(
            "fine-grained experts are exact while router logits of different copies do not tie; in fp32 ties "
            "are negligible, in bf16/fp16 inference a few percent of tokens per layer can tie and then use "
            "an uneven mix of slices until the router is trained"
        )
    return notes


def _report(plan: UpcyclePlan, out: Path, files: list[str], verification: Verification | None) -> UpcycleReport:
    c, lay = plan.config, plan.layout
    argv = list(c.argv) if c.argv is not None else reproduce_argv(plan.source, out, c)
    return UpcycleReport(
        source={
            "path": str(plan.source),
            "model_type": plan.source_type,
            "architecture": (plan.weights.base.config.get("architectures") or [None])[0],
            "experts_from": [str(p) for p in c.experts_from],
            "lora_experts": [str(p) for p in c.lora_experts],
        },
        target={"model_type": plan.target.model_type, "architecture": plan.target.architecture},
        recipe={
            "num_experts": lay.num_experts,
            "top_k": lay.top_k,
            "granularity": lay.granularity,
            "shared_experts": lay.shared_slices,
            "copies": lay.copies,
            "expert_intermediate_size": lay.slice_width,
            "shared_expert_intermediate_size": lay.shared_width,
            "down_proj_scale": lay.alpha,
            "moe_layers": plan.moe_layers,
            "router_init": c.router_init,
            "drop_ratio": c.drop_ratio,
            "noise": c.noise,
            "seed": c.seed,
            "dtype": str(plan.out_dtype).replace("torch.", ""),
            "exact": plan.exact,
            "inexact_reasons": plan.inexact_reasons,
        },
        argv=argv,
        command_line=shlex.join(argv),
        total_params=plan.total_params,
        active_params=plan.active_params,
        verification=verification.to_dict() if verification else None,
        output={"path": str(out), "files": sorted(files + [REPORT_NAME]), "bytes": plan.output_bytes},
        notes=_notes(plan),
    )
