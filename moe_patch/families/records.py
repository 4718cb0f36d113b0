"""The one way moe-patch changes a module of a user's model: instance attributes set with :func:`set_attrs`
(forwards with :func:`bind_forward`), each recorded on the module itself so that :func:`restore` puts back
exactly what was there. Patching and offloading both install through these (offloading also swaps the expert
parameters for placeholders and adds model hooks, in ``moe_patch/offload/attach.py``, which undoes them).
"""

from __future__ import annotations

import enum
import logging
import types
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

#: The attribute moe-patch adds to each module it changes: what every attribute it set held before.
#: The record lives on the module itself, so unpatching restores exactly and a ``copy.deepcopy`` of the
#: model carries records about its own modules (a list of undo closures would point at the original's).
SAVED_ATTR = "_moe_patch_saved"
#: Prefix of what the dispatch caches on a patched module (derived from its weights; dropped on unpatch).
CACHE_PREFIX = "_moe_patch_cache_"
#: the forward moe-patch installed last (restore puts the old one back only while it is still this one)
FORWARD_ATTR = "_moe_patch_forward"


class _Absent(enum.Enum):
    """Marks an attribute the module did not have (an enum member stays itself through copy and pickle)."""

    ABSENT = "absent"


ABSENT = _Absent.ABSENT


def set_attrs(module: torch.nn.Module, **attrs) -> None:
    """Set instance attributes, recording on the module what each held before (the first time only)."""
    saved = module.__dict__.get(SAVED_ATTR)
    if saved is None:
        saved = {}
        object.__setattr__(module, SAVED_ATTR, saved)
    for k, v in attrs.items():
        saved.setdefault(k, module.__dict__.get(k, ABSENT))
        object.__setattr__(module, k, v)
    if "forward" in attrs:
        object.__setattr__(module, FORWARD_ATTR, attrs["forward"])


def bind_forward(module: torch.nn.Module, fn: Callable) -> None:
    """Give one module instance a new forward (its class and every other instance keep theirs). A bound
    method: ``copy.deepcopy`` rebinds it to the copy."""
    set_attrs(module, forward=types.MethodType(fn, module))


def restore(module: torch.nn.Module) -> bool:
    """Put back every attribute :func:`set_attrs` changed on ``module`` and drop the dispatch's caches
    (``_moe_patch_cache_*``); False if it changed nothing."""
    for key in [k for k in module.__dict__ if k.startswith(CACHE_PREFIX)]:
        del module.__dict__[key]
    saved = module.__dict__.pop(SAVED_ATTR, None)
    installed = module.__dict__.pop(FORWARD_ATTR, None)
    if saved is None:
        return False
    if "forward" in saved and installed is not None and module.__dict__.get("forward") is not installed:
        # another library wrapped the forward after moe-patch (accelerate's hooks keep ours inside theirs):
        # putting the old one back would strip their wrapper, so theirs stays; ours, inside it, stands down to
        # the forward it replaced where it can (``stand_down``), else keeps working there
        stands_down = callable(getattr(installed, "stand_down", None))
        if stands_down:
            installed.stand_down()
        logger.warning(
            "%s: its forward was wrapped after moe-patch changed it; the wrapper is kept%s.",
            type(module).__name__,
            " and computes the original forward inside it"
            if stands_down
            else " with moe-patch's forward inside it (remove the wrapper first, e.g. accelerate's "
            "remove_hook_from_module, then unpatch, to restore the original)",
        )
        saved = {k: v for k, v in saved.items() if k != "forward"}
    for k, v in saved.items():
        if v is ABSENT:
            module.__dict__.pop(k, None)
        else:
            object.__setattr__(module, k, v)
    return True


class DerivedCache:
    """A value derived from a module's weights (a native kernel over them), kept on the module under a
    :data:`CACHE_PREFIX` name with the key it was derived for. A copy or pickle of the module carries an empty one:
    the copy derives its own from its own weights on first use (the original's points into the original's
    weights, and ctypes pointers do not pickle)."""

    def __init__(self, key: object = None, value: object = None) -> None:
        self.key, self.value = key, value

    def __reduce__(self):
        return (DerivedCache, ())


def derived(module: torch.nn.Module, name: str, key: object, build: Callable[[], object]) -> object:
    """The value kept on ``module`` as ``name`` (a :data:`CACHE_PREFIX` name) while ``key`` holds, else ``build()``
    kept for ``key``."""
    cache = module.__dict__.get(name)
    if isinstance(cache, DerivedCache) and cache.key is not None and cache.key == key:
        return cache.value
    value = build()
    module.__dict__[name] = DerivedCache(key, value)
    return value


def changed_modules(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules under ``root`` that carry a moe-patch record."""
    return (m for m in root.modules() if SAVED_ATTR in m.__dict__)
