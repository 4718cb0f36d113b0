"""Find the Mixture-of-Experts families of the installed transformers, from its own sources.

No hand-written list: every model type registered in transformers' config auto-mapping is grouped
by its modeling module, and the module's *source text* is parsed (not imported; importing ~550
modeling modules costs minutes) to decide whether it builds experts. A module is MoE when one of
its classes

* is decorated with transformers' ``@use_experts_implementation`` (the 5.x experts interface), or
* builds experts structurally in ``__init__``: assigns a module or parameter to an attribute whose
  name says "expert" (``self.experts = nn.ModuleList(...)``, ``self.shared_experts = ...`` does not
  count on its own), or constructs a layer / parameter / tensor whose shape names an experts count
  (``nn.Linear(hidden, config.num_local_experts)``, ``nn.Parameter(torch.empty(num_experts, ...))``,
  ``nn.Embedding(self.num_experts, ...)``).

The second rule is what makes a future family without the decorator (an adapter candidate) show up.
A second, independent signal covers a modeling module that imports its MoE block from another
family: the family's ``configuration_*.py`` declares an experts count field (``num_experts``,
``num_local_experts``, ``n_routed_experts``, ``moe_num_experts``). On transformers 5.23 both
signals find the same 73 modules.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MoEFamily", "discover_moe_families", "moe_family_info"]

# An identifier naming experts (plural: "expert_hidden_size" of pi0's action expert is no MoE):
# num_experts, num_local_experts, n_routed_experts, self.experts; num_experts_per_tok is excluded.
_EXPERT_NAME = re.compile(r"experts", re.IGNORECASE)
# Attributes that hold *shared* (always active) experts do not make a block MoE on their own.
_SHARED = re.compile(r"shared", re.IGNORECASE)
# Calls that build a module / parameter / tensor (the callee's last name).
_BUILDERS = {
    "Linear",
    "Parameter",
    "Embedding",
    "ModuleList",
    "ModuleDict",
    "empty",
    "zeros",
    "ones",
    "randn",
    "rand",
    "Conv1d",
}


@dataclass(frozen=True)
class MoEFamily:
    """One MoE family found in transformers.

    Attributes:
        model_type: the root model type of the family (the config that holds the others).
        module: the ``transformers.models`` sub-package name.
        decorated: its experts use transformers' ``@use_experts_implementation``.
        model_types: every model type registered for the module (sub-configs included).
    """

    model_type: str
    module: str
    decorated: bool
    model_types: tuple[str, ...]


def _names_in(node: ast.AST) -> list[str]:
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.append(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.append(sub.attr)
    return out


def _callee(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _is_experts_decorator(dec: ast.expr) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name == "use_experts_implementation"


def _init_builds_experts(init: ast.FunctionDef) -> bool:
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for tgt in node.targets:
                if (
                    isinstance(tgt, ast.Attribute)
                    and isinstance(tgt.value, ast.Name)
                    and tgt.value.id == "self"
                    and _EXPERT_NAME.search(tgt.attr)
                    and not _SHARED.search(tgt.attr)
                    and not tgt.attr.startswith(("num_", "n_"))
                    and _callee(node.value) not in ("int", "getattr", "float", "bool", "max", "min")
                ):
                    return True
        if isinstance(node, ast.Call) and _callee(node) in _BUILDERS:
            args = list(node.args) + [kw.value for kw in node.keywords]
            if any(
                _EXPERT_NAME.search(n) and not _SHARED.search(n) and "per_tok" not in n
                for arg in args
                for n in _names_in(arg)
            ):
                return True
    return False


_DECORATOR_LINE = re.compile(r"^@use_experts_implementation\b", re.MULTILINE)


def classify_source(source: str) -> tuple[bool, bool]:
    """``(is_moe, decorated)`` for one modeling module's source text."""
    if "expert" not in source.lower():  # cheap pre-filter: parsing every module takes ~20 s
        return False, False
    if _DECORATOR_LINE.search(source):  # a top-level class decorator line; no parse needed
        return True, True
    tree = ast.parse(source)
    decorated = structural = False
    for node in tree.body:  # modeling modules define their classes at top level
        if not isinstance(node, ast.ClassDef):
            continue
        if any(_is_experts_decorator(d) for d in node.decorator_list):
            decorated = True
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__" and _init_builds_experts(item):
                structural = True
    return decorated or structural, decorated


_CONFIG_EXPERTS_FIELD = re.compile(
    r"^\s+(num_experts|num_local_experts|n_routed_experts|moe_num_experts)\s*[:=]", re.MULTILINE
)


def _sources(module: str, prefix: str) -> list[Path]:
    spec = importlib.util.find_spec(f"transformers.models.{module}")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations)))
    return sorted(folder.glob(f"{prefix}_*.py"))


def config_declares_experts(source: str) -> bool:
    """A configuration module's source declares an experts count field."""
    return bool(_CONFIG_EXPERTS_FIELD.search(source))


def _root_model_type(model_types: list[str], module: str) -> str:
    """The family's root: the model type whose config is not a sub-config of another one here."""
    if len(model_types) == 1:
        return model_types[0]
    if module in model_types:
        return module
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    sub: set[str] = set()
    for mt in model_types:
        cls = CONFIG_MAPPING[mt]
        for sub_cls in (getattr(cls, "sub_configs", None) or {}).values():
            sub.add(getattr(sub_cls, "model_type", ""))
    roots = [mt for mt in model_types if mt not in sub]
    return sorted(roots or model_types, key=len)[0]


@functools.lru_cache(maxsize=1)
def _discover() -> tuple[MoEFamily, ...]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    by_module: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        by_module.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    families = []
    for module, model_types in by_module.items():
        is_moe = decorated = False
        for path in _sources(module, "modeling"):
            moe, dec = classify_source(path.read_text(encoding="utf-8"))
            is_moe, decorated = is_moe or moe, decorated or dec
        if not is_moe:
            is_moe = any(
                config_declares_experts(p.read_text(encoding="utf-8")) for p in _sources(module, "configuration")
            )
        if is_moe:
            root = _root_model_type(model_types, module)
            families.append(MoEFamily(root, module, decorated, tuple(model_types)))
    return tuple(sorted(families, key=lambda f: f.model_type))


def discover_moe_families() -> list[str]:
    """Root model types of every MoE family of the installed transformers, sorted.

    Found by reading the modeling and configuration sources (see the module docstring); no
    modeling module is imported (only the config classes of families with several configs, to
    tell the root config from its sub-configs).
    """
    return [f.model_type for f in _discover()]


def moe_family_info(model_type: str) -> MoEFamily:
    """The :class:`MoEFamily` record of a discovered family (``KeyError`` if it is not one)."""
    for family in _discover():
        if family.model_type == model_type:
            return family
    raise KeyError(f"{model_type!r} is not a discovered MoE family of this transformers")
