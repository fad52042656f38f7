"""The one registry of editing methods: a name, its hyperparameter class and its method class.

A method registers itself with one call, in the spirit of PEFT's
``register_peft_method``::

    from alphaedit_plugin.registry import register_method
    register_method("MyEdit", MyEditHyperParams, MyEdit)

and is then found by everything that runs methods: the edit loop (by the
class of the hparams), the EasyEdit dispatcher (``ALG_DICT[name]``), the
yaml reader (:func:`load_hparams`, by ``alg_name``), ``alphaedit-bench``'s
method list and its shipped-yaml lookup (by label). A name already taken is
refused.

A method may come in variants, settings of its own hparams that tables list
as methods of their own: MEMIT, ``MEMIT+P`` (``projection: true``),
``MEMIT@easyeditor`` (``memit_steps: easyeditor``)... Each
:class:`Variant` names its label suffix, the suffix of its shipped yaml file
and the fields it sets; the labels ``alphaedit-bench`` accepts are the
registered names with their variants' suffixes.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .hparams import EditHyperParams, read_yaml

logger = logging.getLogger(__name__)

# The yaml files shipped inside the package (package data; the repository's top-level hparams/ links here).
HPARAMS_ROOT = Path(str(importlib.resources.files(__package__) / "shipped_hparams"))
# Model names with shipped yaml files: hparams/<method>/<key><variant's yaml suffix>.yaml
MODEL_KEYS = {"smollm2": "smollm2-135m"}


@dataclass(frozen=True)
class Variant:
    """One setting of a method that is listed as a method of its own (``MEMIT+P``)."""

    suffix: str = ""  # appended to the method's name in labels: "+P", "@easyeditor+P"
    yaml_suffix: str = ""  # appended to the model key in shipped yaml names: "-projected"
    fields: Mapping[str, Any] = field(default_factory=dict)  # hparams fields the variant sets


@dataclass(frozen=True)
class RegisteredMethod:
    name: str  # the alg_name, as in EasyEdit's ALG_DICT
    hparams_class: type
    method_class: type
    variants: Tuple[Variant, ...] = (Variant(),)

    def labels(self) -> List[str]:
        return [self.name + variant.suffix for variant in self.variants]


_METHODS: Dict[str, RegisteredMethod] = {}
_LISTENERS: List[Callable[[RegisteredMethod, bool], None]] = []


def register_method(name: str, hparams_class: type, method_class: type,
                    variants: Tuple[Variant, ...] = (Variant(),)) -> RegisteredMethod:
    """Make a method available everywhere; refuses a name (or a label of a variant) already taken."""
    from .methods.base import EditMethod

    if not isinstance(name, str) or not name.strip() or any(c in name for c in "+@/ "):
        raise ValueError(f"method name must be a non-empty string without '+', '@', '/' or spaces, got {name!r}")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered (by {_METHODS[name].method_class.__qualname__}); "
                         "unregister_method it first or choose another name")
    if not (isinstance(hparams_class, type) and issubclass(hparams_class, EditHyperParams)):
        raise TypeError(f"hparams_class for {name!r} must be a subclass of alphaedit_plugin.hparams.EditHyperParams, "
                        f"got {hparams_class!r}")
    if hparams_class.ALG_NAME != name:
        raise ValueError(f"hparams_class {hparams_class.__name__} has ALG_NAME {hparams_class.ALG_NAME!r}, "
                         f"not {name!r}")
    if not (isinstance(method_class, type) and issubclass(method_class, EditMethod)):
        raise TypeError(f"method_class for {name!r} must be a subclass of alphaedit_plugin.methods.base.EditMethod, "
                        f"got {method_class!r}")
    for registered in _METHODS.values():
        if registered.hparams_class is hparams_class:
            raise ValueError(f"{hparams_class.__name__} is already the hparams class of {registered.name!r}")
    entry = RegisteredMethod(name, hparams_class, method_class, tuple(variants))
    taken = set(labels())
    clash = [label for label in entry.labels() if label in taken]
    if clash:
        raise ValueError(f"method {name!r} would add labels {clash}, which are taken")
    _METHODS[name] = entry
    for listener in list(_LISTENERS):
        listener(entry, True)
    logger.debug("registered method %s (%s, %s)", name, hparams_class.__name__, method_class.__name__)
    return entry


def unregister_method(name: str) -> bool:
    """Remove a registered method (and its EasyEdit entry); True if it was registered."""
    entry = _METHODS.pop(name, None)
    if entry is None:
        return False
    for listener in list(_LISTENERS):
        listener(entry, False)
    return True


def add_listener(listener: Callable[[RegisteredMethod, bool], None]) -> None:
    """Call ``listener(entry, registered)`` on every later (un)registration (the EasyEdit host uses it)."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def remove_listener(listener: Callable[[RegisteredMethod, bool], None]) -> None:
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


# ---------------------------------------------------------------------------
def registered_methods() -> List[RegisteredMethod]:
    return list(_METHODS.values())


def registered(name: str) -> RegisteredMethod:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def entry_for(hparams: Any) -> Optional[RegisteredMethod]:
    """The registered method whose hparams class is nearest to ``type(hparams)`` (None if there is none)."""
    for cls in type(hparams).__mro__:
        for entry in _METHODS.values():
            if entry.hparams_class is cls:
                return entry
    return None


def method_for(hparams: Any):
    """The method object that edits with ``hparams``."""
    entry = entry_for(hparams)
    if entry is None:
        raise TypeError(f"hparams must be an object of a registered method's hparams class "
                        f"({', '.join(e.hparams_class.__name__ for e in _METHODS.values())}), got "
                        f"{type(hparams).__module__}.{type(hparams).__qualname__}; load them with "
                        "alphaedit_plugin.load_hparams(path) or e.g. AlphaEditHyperParams(**fields)")
    return entry.method_class(hparams)


def hparams_class_for(alg_name: Any) -> type:
    if alg_name not in _METHODS:
        raise ValueError(f"alg_name must be one of {sorted(_METHODS)}, got {alg_name!r}")
    return _METHODS[alg_name].hparams_class


def load_hparams(path) -> EditHyperParams:
    """Read a yaml file of any registered method; the class is chosen by its ``alg_name``."""
    config, source = read_yaml(path)
    alg_name = config.get("alg_name")
    if alg_name not in _METHODS:
        raise ValueError(f"{source}: alg_name must be one of {sorted(_METHODS)}, got {alg_name!r}")
    return _METHODS[alg_name].hparams_class.from_dict(config, source=source)


# ---- labels: how tables and alphaedit-bench name methods and variants ------
def labels() -> List[str]:
    return [label for entry in _METHODS.values() for label in entry.labels()]


def parse_label(label: str) -> Tuple[RegisteredMethod, Variant]:
    """``"PRUNE+P"`` -> (PRUNE's entry, its ``+P`` variant)."""
    for entry in _METHODS.values():
        for variant in entry.variants:
            if entry.name + variant.suffix == label:
                return entry, variant
    raise ValueError(f"unknown method {label!r}; registered: {', '.join(labels())}")


def check_variant(label: str, hparams: Any, where: str, hint: str = "") -> None:
    """Refuse hparams that are not ``label``'s (another method, or another variant's settings)."""
    entry, variant = parse_label(label)
    if not isinstance(hparams, entry.hparams_class) or hparams.alg_name != entry.name:
        raise ValueError(f"{label} needs hparams with alg_name: {entry.name}, but {where} has alg_name: "
                         f"{getattr(hparams, 'alg_name', None)}{hint}")
    defaults = {name: value for other in entry.variants for name, value in other.fields.items()}
    for name, default in defaults.items():
        wanted = variant.fields.get(name, _baseline_value(entry, name, default))
        value = getattr(hparams, name, None)
        if value != wanted:
            shown = str(wanted).lower() if isinstance(wanted, bool) else wanted
            have = str(value).lower() if isinstance(value, bool) else value
            raise ValueError(f"{label} needs hparams with {name}: {shown}, but {where} has {name}: {have} "
                             f"(it is {getattr(hparams, 'label', '?')}'s){hint}")


def _baseline_value(entry: RegisteredMethod, name: str, fallback: Any) -> Any:
    """The value of field ``name`` in the method's plain variant: the hparams class's default."""
    for spec in dataclasses.fields(entry.hparams_class):
        if spec.name == name and spec.default is not dataclasses.MISSING:
            return spec.default
    return fallback


def model_key(model: str) -> Optional[str]:
    """The shipped-yaml key of a model name (``smollm2`` -> ``smollm2-135m``), or None if none is shipped."""
    name = str(model).lower()
    return next((key for prefix, key in MODEL_KEYS.items() if name.startswith(prefix)), None)


def shipped_hparams_path(label: str, model: str) -> Optional[Path]:
    """``hparams/<method>/<model key><variant's yaml suffix>.yaml`` if it is shipped, else None."""
    key = model_key(model)
    if key is None:
        return None
    entry, variant = parse_label(label)
    path = HPARAMS_ROOT / entry.name / f"{key}{variant.yaml_suffix}.yaml"
    return path if path.is_file() else None


def yaml_name(label: str, key: str) -> str:
    """The shipped yaml's path under hparams/ for ``label`` and a model key (for messages)."""
    entry, variant = parse_label(label)
    return f"hparams/{entry.name}/{key}{variant.yaml_suffix}.yaml"
