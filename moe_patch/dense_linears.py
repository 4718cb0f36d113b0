"""A decode step's dense linears (attention projections, lm_head, routers, shared experts) computed by the CPU
kernels' GEMV (:class:`moe_patch.kernels.linear.LinearKernel`) at the row counts and weight sizes where this machine
measured it faster than torch's ``F.linear`` (:meth:`~moe_patch.kernels.crossover.Crossovers.linear_rows`,
:meth:`~moe_patch.kernels.crossover.Crossovers.linear_min_bytes`).

In a decode step of a CPU-resident MoE model the dense weights are about half the bytes read (gpt-oss-20b's
attention and lm_head against its four routed experts), and torch's bf16 GEMV reads them at about half the
machine's bandwidth. :func:`install_dense_linears` gives each plain ``nn.Linear`` on the CPU a forward that takes
the kernel for few rows and ``F.linear`` otherwise, and under autograd, autocast and ``torch.compile`` (the kernel
has no backward and is opaque to dynamo). The change is recorded on the module (:mod:`.families.records`), so
``unpatch_model`` and an offload handle's ``detach`` restore it; the module, its parameters and ``state_dict``
are untouched. Numbers: fp32 sums in another order (within 1e-6 relative); bf16 rounds once, as torch does.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

from .families.records import CACHE_PREFIX, derived, set_attrs

logger = logging.getLogger(__name__)

#: recorded on each module given the kernel forward (restore removes it)
MARK_ATTR = "_moe_patch_dense_linear"
_KERNEL_ATTR = CACHE_PREFIX + "linear_kernel"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FAILED: set[torch.dtype] = set()  # dtypes whose measurement failed (logged once)
#: smaller weights never get the kernel forward: at 64 KiB a call's fixed cost, not the bytes, sets the time on any
#: machine; between this and the sizes measured faster (``Crossovers.linear_min_bytes``) calls stay with torch
MIN_WEIGHT_BYTES = 64 << 10


def is_dense_linear(module: nn.Module) -> bool:
    """Whether :func:`install_dense_linears` gave ``module`` its kernel forward (and it is still there)."""
    return bool(module.__dict__.get(MARK_ATTR))


def _max_rows(dtype: torch.dtype, nbytes: int) -> float:
    """Rows up to which the GEMV beats ``F.linear`` here for a ``dtype`` weight of ``nbytes``; 0 where it does not
    or cannot be measured (the speed-up is optional: a failed measurement leaves torch's path, with one log line)."""
    from .kernels.crossover import CROSSOVERS

    try:
        return CROSSOVERS.linear_rows(dtype) if nbytes >= CROSSOVERS.linear_min_bytes(dtype) else 0.0
    except Exception as exc:  # noqa: BLE001 - any failure of an optional speed-up keeps torch's path
        if dtype not in _FAILED:
            _FAILED.add(dtype)
            logger.warning("dense linears stay with torch for %s: measuring the kernel GEMV failed: %s", dtype, exc)
        return 0.0


def _kernel(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None):
    """The kernel over the module's own weight (referenced), kept while the weight and bias stay where they are."""
    from .kernels import KernelUnavailableError
    from .kernels.linear import LinearKernel

    key = (weight.data_ptr(), weight.dtype, weight.shape, weight.stride(), None if bias is None else bias.data_ptr())

    def build():
        try:
            return LinearKernel(weight.detach(), None if bias is None else bias.detach())
        except KernelUnavailableError as exc:  # e.g. a weight made non-contiguous: torch's path from now on
            logger.debug("dense linear left to torch: %s", exc)
            return None

    return derived(module, _KERNEL_ATTR, key, build)


def _plain(t: torch.Tensor) -> bool:
    """A dense CPU tensor with storage the kernels can read (not a subclass, a functorch wrapper or a dual)."""
    return type(t) in (torch.Tensor, nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _where(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """Where a kernel's weight and bias are and what they hold: ``.data`` given a new tensor (even at the same
    address, another shape or dtype) changes it."""
    return (
        weight.data_ptr(),
        weight.shape,
        weight.dtype,
        None if bias is None else (bias.data_ptr(), bias.shape, bias.dtype),
    )


def _torch_only() -> bool:
    """A mode in which a call must go through torch's ops: autograd recording is checked per tensor; these are the
    global ones (compiling, tracing, scripting, autocast, functorch transforms, forward-mode AD: the kernel would
    drop a dual input's tangent)."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.is_autocast_enabled("cpu")
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
    )


def kernel_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's name
    """``nn.Linear.forward`` through the kernel GEMV where it is measured faster: plain CPU tensors of one dtype
    the kernels read, no autograd, autocast, tracing, compiling or functorch transform, few rows."""
    return _forward(self, input, None)


def _forward(self: nn.Linear, input: torch.Tensor, state: KernelLinearForward | None) -> torch.Tensor:  # noqa: A002
    """:func:`kernel_linear_forward`; ``state`` (the module's forward object) keeps what the last kernel call found
    (the kernel, its weight and bias, the rows it takes) so a decode step checks identities, not the whole list."""
    weight, bias = self.weight, self.bias
    if not weight.is_cpu:  # the model moved: do not keep its old CPU weight alive through the kernel
        self.__dict__.pop(_KERNEL_ATTR, None)
        if state is not None:
            state.ready = None
        return F.linear(input, weight, bias)
    if _torch_only() or (
        torch.is_grad_enabled()
        and (input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return F.linear(input, weight, bias)
    rows = input.numel() // input.shape[-1] if input.dim() and input.shape[-1] else 0
    ready = state.ready if state is not None else None
    if (
        ready is not None
        and ready[0] is weight
        and ready[1] is bias
        and ready[2] == _where(weight, bias)
        and ready[3] is input.dtype
        and ready[4] == torch.get_num_threads()
        and input.is_cpu
        and _plain(input)
    ):
        if 0 < rows <= ready[5]:
            return ready[6](input if input.is_contiguous() else input.contiguous())
        return F.linear(input, weight, bias)
    if (
        input.dtype != weight.dtype
        or weight.dtype not in _DTYPES
        or (bias is not None and bias.dtype != weight.dtype)
        or not input.is_cpu
        or not (_plain(input) and _plain(weight) and (bias is None or _plain(bias)))
        or rows == 0
    ):
        return F.linear(input, weight, bias)
    max_rows = _max_rows(weight.dtype, weight.numel() * weight.element_size())
    kernel = _kernel(self, weight, bias) if max_rows > 0 else None
    if state is not None:  # the weight and bias by identity and address: a swapped tensor or .data decides again
        where = _where(weight, bias)
        takes = max_rows if kernel is not None else 0.0  # 0: this weight stays with torch (small, or slower here)
        state.ready = (weight, bias, where, weight.dtype, torch.get_num_threads(), takes, kernel)
    if kernel is None or rows > max_rows:
        return F.linear(input, weight, bias)
    return kernel(input if input.is_contiguous() else input.contiguous())  # the kernel reads whole rows


class KernelLinearForward:
    """One module's forward, :func:`kernel_linear_forward`. An object with ``__reduce__`` (a bound method would not
    pickle: the module has no attribute of its name), so a deepcopy or a pickled copy of the model gets one bound
    to its own copy of the module; it holds the module weakly (no reference cycle keeping the weights alive)."""

    def __init__(self, module: nn.Linear, active: bool = True):
        self._module = weakref.ref(module)
        self.active = active
        #: what the last call decided: weight, bias, :func:`_where`, dtype, threads, rows the kernel takes, kernel
        self.ready: tuple | None = None

    def __call__(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear.forward's argument name
        module = self._module()
        if not self.active:
            return nn.Linear.forward(module, input)
        return _forward(module, input, self)

    def stand_down(self) -> None:
        """Compute ``nn.Linear``'s own forward from now on (unpatched while another library's wrapper holds this)."""
        self.active = False
        self.ready = None
        self._module().__dict__.pop(_KERNEL_ATTR, None)

    def __reduce__(self):
        return (KernelLinearForward, (self._module(), self.active))


def install_dense_linears(root: nn.Module, exclude: set[int] | None = None, *, meta: bool = False) -> int:
    """Give every plain ``nn.Linear`` under ``root`` whose weight is on the CPU in bf16, fp16 or fp32, of at least
    :data:`MIN_WEIGHT_BYTES`, the kernel forward (where the kernels run here; whether they beat ``F.linear`` for
    that dtype, and up to how many rows, is measured at the first call they could take). Modules in ``exclude``
    (ids) and modules whose forward someone already replaced (accelerate hooks) are left alone. ``meta``: weights
    still on the meta device count as CPU ones (a model built empty, loaded onto the CPU next). Returns how many
    modules were changed."""
    from .kernels import available

    if not available():
        return 0
    changed, where = 0, ("cpu", "meta") if meta else ("cpu",)
    for module in root.modules():
        if type(module) is not nn.Linear or id(module) in (exclude or ()) or "forward" in module.__dict__:
            continue
        w = module.weight
        if not isinstance(w, torch.Tensor) or w.device.type not in where or w.dtype not in _DTYPES or w.dim() != 2:
            continue
        if w.numel() * w.element_size() < MIN_WEIGHT_BYTES:
            continue
        # no measurement here: it runs at the first call the kernel could take (a model patched for training,
        # whose calls all need autograd, never measures nor runs a kernel)
        set_attrs(module, forward=KernelLinearForward(module), **{MARK_ATTR: True})
        changed += 1
    return changed
