"""Where the monitor listens: which module of each MoE block shows its routing, and the hooks on them.

Only forward hooks and forward pre-hooks are added (removed by :meth:`Taps.remove`); no forward,
parameter or attribute of the model changes, so patched, offloaded and peft-wrapped models run exactly
as before. Hooks wrap ``Module.__call__``, so they still fire when the offload engine or an adapter has
replaced a module instance's ``forward``.

A forward of the model itself opens the window in which hooks count (pre-hook on the model, forward hook
with ``always_call``): gradient-checkpointing recomputation, which re-runs blocks during backward, falls
outside it and is not counted twice.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..detect.routing import infer_routing
from ..detect.spec import BlockHandle, RoutingSpec
from ..detect.structure import model_root
from ..errors import MoEConfigError
from . import readers
from .blocks import resolve_block
from .counters import LayerCounter

logger = logging.getLogger(__name__)


WHEN = ("always", "train", "eval")


@dataclass
class Tap:
    """How one block is observed."""

    counter: LayerCounter
    reader: str  # "experts_call" or a family's ``routing_reader`` (a function of .readers)
    routing_module: nn.Module  # the experts (pre-hook) or the router (forward hook)
    logits_module: nn.Module | None
    logits_index: int | None  # position of the logits in logits_module's output (None: find them by shape)
    spec: RoutingSpec
    arg_names: tuple[str, str] = ("top_k_index", "top_k_weights")
    failed: str | None = None


@dataclass
class HookState:
    """What the hooks should do right now (set by the monitor, read by every hook)."""

    when: str = "always"
    router_stats: bool = True
    depth: int = 0  # forwards of the model in progress
    counting: bool = False
    probing: bool = False
    calls: int = 0

    def enter(self, module: nn.Module) -> None:
        self.depth += 1
        if self.depth == 1:
            allowed = self.when == "always" or (self.when == "train") == module.training
            self.counting = allowed and not self.probing
            self.calls += self.counting

    def leave(self) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.counting = False

    @property
    def observing(self) -> bool:
        return self.depth > 0 and (self.counting or self.probing)


@dataclass
class Taps:
    taps: list[Tap]
    skipped: dict[str, str]
    _handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- planning


def _routing_arg_names(experts: nn.Module) -> tuple[str, str] | None:
    """Names of the routing arguments when the experts are called as ``experts(hidden, index, weights)``."""
    try:
        params = list(inspect.signature(type(experts).forward).parameters)
    except (TypeError, ValueError):
        return None
    return (params[2], params[3]) if len(params) >= 4 else None


def _router_recorders(root: nn.Module) -> list[Any]:
    """transformers' own statement of where each family's router logits are: the ``router_logits``
    entries of ``_can_record_outputs`` (OutputRecorder: module class, output index, optional layer name)."""
    from transformers.utils.output_capturing import OutputRecorder

    found = []
    for module in root.modules():
        spec = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        for r in spec if isinstance(spec, list) else [spec]:
            if isinstance(r, OutputRecorder) and isinstance(r.target_class, type):
                found.append(r)
            elif isinstance(r, type):
                found.append(OutputRecorder(r, index=1))  # a bare class means index 1 (transformers' rule)
    return found


def _logits_source(
    block_path: str, block: nn.Module, experts: nn.Module, router: nn.Module | None, recorders: list[Any]
) -> tuple[nn.Module | None, int | None]:
    inside_experts = {id(m) for m in experts.modules()}
    for rec in recorders:
        for rel, module in block.named_modules():
            if id(module) in inside_experts or not isinstance(module, rec.target_class):
                continue
            full = f"{block_path}.{rel}" if block_path and rel else (block_path or rel)
            if rec.layer_name and f".{rec.layer_name.strip('.')}." not in f".{full}.":
                continue
            return module, rec.index
    return router, None


def plan_taps(model: nn.Module, handles: list[BlockHandle]) -> tuple[list[Tap], dict[str, str]]:
    """One :class:`Tap` per block whose routing hooks can see; the others with the reason."""
    root = model_root(model)
    recorders = _router_recorders(root)
    taps: list[Tap] = []
    skipped: dict[str, str] = {}
    for h in handles:
        info = h.info
        real = resolve_block(root, h)
        block_path, block, router = real.path, real.block, real.router
        spec = info.routing if block is h.block else infer_routing(router, block, real.experts)
        reader = h.family.routing_reader
        if reader is None and info.zero_experts and not hasattr(h.experts, "zero_expert_num"):
            reader = "router_table"  # the block hides zero-expert picks from its experts: only the router shows them
        names = None
        if reader is None:
            names = _routing_arg_names(h.experts) if spec.kind not in ("per_input", "product_key") else None
            if names is None:
                skipped[info.experts_path] = (
                    f"its routing ({spec.kind}) is not passed to the experts, so hooks cannot see it"
                )
                continue
            reader = "experts_call"
        elif router is None:
            skipped[info.experts_path] = "no router found next to the experts"
            continue
        logits_module, logits_index = _logits_source(block_path, block, h.experts, router, recorders)
        if reader != "experts_call" and logits_module is not router:
            logits_module, logits_index = router, None
        counter = LayerCounter(info.experts_path, info.num_experts, info.top_k, info.zero_experts, spec.kind)
        taps.append(
            Tap(
                counter=counter,
                reader=reader,
                routing_module=h.experts if reader == "experts_call" else router,
                logits_module=logits_module,
                logits_index=logits_index,
                spec=spec,
                arg_names=names or ("top_k_index", "top_k_weights"),
            )
        )
    return taps, skipped


# --------------------------------------------------------------------------- hooks


def _guarded(tap: Tap, fn: Callable) -> Callable:
    """A hook must never break the model's forward: an unexpected router output disables its layer."""

    def hook(*args):
        if tap.failed is not None:
            return None
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported once, then that layer is left alone
            tap.failed = f"{type(exc).__name__}: {exc}"
            logger.warning("routing monitor: stopped watching %s (%s)", tap.counter.path, tap.failed)
        return None

    return hook


def _observe(tap: Tap, state: HookState, routing: readers.Routing | None) -> None:
    if routing is None:
        return
    if state.counting:
        tap.counter.add_routing(routing)
    if state.probing:
        tap.counter.capture_top1(routing)


def _router_hook(tap: Tap, state: HookState):
    c = tap.counter

    def hook(module, args, output):
        if not state.observing:
            return
        logits = readers.pick_logits(output, tap.logits_index, c.width)
        if logits is not None and state.counting and state.router_stats:
            c.add_logits(logits)
        if tap.reader == "capacity":
            routing = readers.capacity(output, c.num_experts, c.top_k, logits)
        elif tap.reader == "dense_scores":
            routing = readers.dense_scores(output, c.top_k)
        elif tap.reader == "sorted_plan":
            routing = readers.sorted_plan(output, c.top_k)
        else:
            routing = readers.router_table(output, tap.spec, c.num_experts, c.top_k, logits)
        _observe(tap, state, routing)

    return hook


def _logits_hook(tap: Tap, state: HookState):
    def hook(module, args, output):
        if state.counting and state.router_stats:
            logits = readers.pick_logits(output, tap.logits_index, tap.counter.width)
            if logits is not None:
                tap.counter.add_logits(logits)

    return hook


def _experts_pre_hook(tap: Tap, state: HookState):
    def hook(module, args, kwargs):
        if state.observing:
            _observe(tap, state, readers.experts_call(args, kwargs, tap.arg_names))

    return hook


def install(model: nn.Module, taps: list[Tap], skipped: dict[str, str], state: HookState) -> Taps:
    """Register every hook; the returned :class:`Taps` removes them."""
    out = Taps(taps=taps, skipped=skipped)
    windows = [model] + ([model_root(model)] if model_root(model) is not model else [])
    for w in windows:
        out._handles.append(w.register_forward_pre_hook(lambda m, a: state.enter(m)))
        out._handles.append(w.register_forward_hook(lambda m, a, o: state.leave(), always_call=True))
    for tap in taps:
        if tap.reader == "experts_call":
            if tap.logits_module is not None:
                out._handles.append(tap.logits_module.register_forward_hook(_guarded(tap, _logits_hook(tap, state))))
            out._handles.append(
                tap.routing_module.register_forward_pre_hook(
                    _guarded(tap, _experts_pre_hook(tap, state)), with_kwargs=True
                )
            )
        else:
            out._handles.append(tap.routing_module.register_forward_hook(_guarded(tap, _router_hook(tap, state))))
    return out


def check_when(when: str) -> str:
    if when not in WHEN:
        raise MoEConfigError(f"monitor(when={when!r}): choose one of {', '.join(WHEN)}")
    return when


__all__ = ["HookState", "Tap", "Taps", "check_when", "install", "plan_taps"]
