"""Registering the plugin's methods in EasyEdit's ``ALG_DICT`` (idempotent, reversible).

Every method of :mod:`alphaedit_plugin.registry` gets an entry, a
:class:`MethodDispatcher`; methods registered later get theirs as they
register. Where the host already has an editor of that name (the current
EasyEdit source ships its own AlphaEdit and MEMIT), the dispatcher chooses
by the **type of the hparams object**: the plugin's hparams class goes to
the plugin, anything else (the host's own ``easyeditor.AlphaEditHyperParams``)
to the host's original function, which the dispatcher keeps and calls
unchanged. Both yaml files say ``alg_name: AlphaEdit``; the class that read
the file decides. Names the host does not have (PRUNE, RECT) raise a
``TypeError`` for other hparams, saying how to load the plugin's.
:func:`unregister` puts the host's entries back.

``register`` also wraps a few ``BaseEditor`` methods so that, for calls made
with the plugin's hparams only, (a) a model given by path is loaded by the
plugin (the hosts pick loader classes by substrings of the path and reject
names such as "SmolLM2"), (b) a ``(model, tokenizer)`` pair leaves a string
in ``editor.model_name`` (both hosts' evaluators call ``model_name.lower()``),
and (c) the CUDA fix of :mod:`.compat` is active where that module says the
host needs it. Calls with other hparams go straight to the host's code.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Dict, Optional

from ... import registry
from ...edit_loop import validate_setup
from ...hparams import EditHyperParams
from ...models import load_model
from . import compat
from .adapter import apply_easyedit

logger = logging.getLogger(__name__)

_MARK = "__alphaedit_plugin_patch__"
_WRAPPED_METHODS = ("edit", "batch_edit", "edit_dataset", "edit_requests", "normal_edit", "generate_edit")


class MethodDispatcher:
    """What ``ALG_DICT[name]`` holds for a method of the plugin once it is registered."""

    def __init__(self, name: str, host_apply: Optional[Callable], host: compat.HostInfo):
        self.name = name
        self.host_apply = host_apply  # the host's own editor of this name, or None
        self.host = host
        setattr(self, _MARK, True)

    def __call__(self, model, tok, requests, hparams, *args: Any, **kwargs: Any):
        entry = registry.entry_for(hparams)
        if entry is not None and entry.name == self.name:
            return apply_easyedit(model, tok, requests, hparams, *args,
                                  restores_only_kept_weights=self.host.restores_only_kept_weights, **kwargs)
        if self.host_apply is not None:
            return self.host_apply(model, tok, requests, hparams, *args, **kwargs)
        raise TypeError(
            f"ALG_DICT[{self.name!r}] is alphaedit_plugin's {self.name} and got hparams of type "
            f"{type(hparams).__module__}.{type(hparams).__name__}; load them with "
            "alphaedit_plugin.load_hparams(path)")

    def __repr__(self) -> str:
        fallback = f"the host's own {self.name}" if self.host_apply is not None else "nothing"
        return f"<alphaedit_plugin {self.name} for alphaedit_plugin hparams; other hparams go to {fallback}>"


# Its name before every method had one.
AlphaEditDispatcher = MethodDispatcher


# ---------------------------------------------------------------------------
def _alg_dict() -> dict:
    try:
        from easyeditor.util import alg_dict
    except ImportError as error:
        raise ImportError(
            "alphaedit_plugin.hosts.easyedit needs the EasyEdit host package `easyeditor` "
            f"({type(error).__name__}: {error}). Put a checkout of the EasyEdit source on sys.path / PYTHONPATH "
            "(git clone https://github.com/zjunlp/EasyEdit)") from error
    return alg_dict.ALG_DICT


def registered_dispatcher(name: str = compat.ALG_NAME) -> Optional[MethodDispatcher]:
    entry = _alg_dict().get(name)
    return entry if getattr(entry, _MARK, False) else None


def is_registered(name: Optional[str] = None) -> bool:
    """Whether ``name`` (default: every registered method) has the plugin's entry in ``ALG_DICT``."""
    names = [name] if name else [entry.name for entry in registry.registered_methods()]
    return all(registered_dispatcher(n) is not None for n in names)


def _add(entry: registry.RegisteredMethod, host: compat.HostInfo) -> MethodDispatcher:
    table = _alg_dict()
    existing = registered_dispatcher(entry.name)
    if existing is not None:
        return existing
    dispatcher = MethodDispatcher(entry.name, table.get(entry.name), host)
    table[entry.name] = dispatcher
    compat.allow_batch_editing([entry.name])
    return dispatcher


def _remove(name: str) -> bool:
    table = _alg_dict()
    dispatcher = registered_dispatcher(name)
    if dispatcher is None:
        return False
    if dispatcher.host_apply is not None:
        table[name] = dispatcher.host_apply
    else:
        del table[name]
    compat.disallow_batch_editing([name])
    return True


def _on_registry_change(entry: registry.RegisteredMethod, added: bool) -> None:
    if added:
        _add(entry, compat.inspect_host())
    else:
        _remove(entry.name)


def register() -> Dict[str, MethodDispatcher]:
    """Add every registered method to ``easyeditor.util.alg_dict.ALG_DICT`` (and later ones as they register);
    calling it again changes nothing."""
    _alg_dict()  # a clear ImportError first where the host is missing
    host = compat.inspect_host()
    _install_editor_hooks(host)
    result = {entry.name: _add(entry, host) for entry in registry.registered_methods()}
    registry.add_listener(_on_registry_change)
    logger.info("alphaedit_plugin: registered %s in easyeditor %s", ", ".join(result), host.version)
    return result


def unregister() -> bool:
    """Undo :func:`register`: the host's own entries and methods come back. True if anything changed."""
    registry.remove_listener(_on_registry_change)
    changed = False
    for entry in registry.registered_methods():
        changed = _remove(entry.name) or changed
    compat.disallow_batch_editing()
    if changed:
        _remove_editor_hooks()
    return changed


# ---------------------------------------------------------------------------
def _editor_class():
    from easyeditor.editors.editor import BaseEditor
    return BaseEditor


def _ours(hparams) -> bool:
    return isinstance(hparams, EditHyperParams)


def _install_editor_hooks(host: compat.HostInfo) -> None:
    editor_cls = _editor_class()
    if not getattr(editor_cls.__init__, _MARK, False):
        editor_cls.__init__ = _wrap_init(editor_cls.__init__, host)
    for name in _WRAPPED_METHODS:
        method = editor_cls.__dict__.get(name)
        if method is not None and not getattr(method, _MARK, False):
            setattr(editor_cls, name, _wrap_method(method, host))


def _remove_editor_hooks() -> None:
    editor_cls = _editor_class()
    for name in ("__init__",) + _WRAPPED_METHODS:
        method = editor_cls.__dict__.get(name)
        if method is not None and getattr(method, _MARK, False):
            setattr(editor_cls, name, method.__wrapped__)


def _device_context(host: compat.HostInfo, hparams):
    if _ours(hparams) and compat.needs_cuda_aliases(host, getattr(hparams, "device", None)):
        return compat.cuda_prefix_aliases()
    return _nothing()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_PER_EDIT_LISTS = ("target_new", "ground_truth", "target_neg", "rephrase_prompts", "subject")


def check_edit_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
    """Raise ``ValueError`` naming the argument whose list length differs from ``prompts``.

    The hosts check some of these with bare ``assert`` (no message) and some
    not at all; this runs first, for AlphaEdit hparams, before any weight changes.
    """
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return  # let the host report a wrong call
    extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
    prompts = bound.get("prompts")
    if not isinstance(prompts, (list, tuple)):
        return
    n = len(prompts)
    if n == 0:
        raise ValueError("prompts is empty; expected at least one prompt to edit")
    for name in _PER_EDIT_LISTS:
        value = bound.get(name, extra.get(name))
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but prompts has {n}; give one per prompt")
    if name_needs_string(bound.get("target_new")):
        raise ValueError("target_new must be a string or a list of strings, one per prompt")
    for group in ("locality_inputs", "portability_inputs"):
        inputs = bound.get(group, extra.get(group))
        if not isinstance(inputs, dict):
            continue
        for key, entry in inputs.items():
            if not isinstance(entry, dict) or "prompt" not in entry or "ground_truth" not in entry:
                raise ValueError(f"{group}[{key!r}] must be a dict with 'prompt' and 'ground_truth'")
            for field_name in ("prompt", "ground_truth"):
                value = entry[field_name]
                if isinstance(value, (list, tuple)) and len(value) != n:
                    raise ValueError(f"{group}[{key!r}][{field_name!r}] has {len(value)} entries but prompts "
                                     f"has {n}; give one per prompt")


def name_needs_string(target_new) -> bool:
    values = target_new if isinstance(target_new, (list, tuple)) else [target_new]
    return target_new is not None and not all(isinstance(v, str) for v in values)


def _wrap_method(method: Callable, host: compat.HostInfo) -> Callable:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hparams = getattr(self, "hparams", None)
        if _ours(hparams):
            check_edit_arguments(signature, (self,) + args, kwargs)
        with _device_context(host, hparams):
            return method(self, *args, **kwargs)

    setattr(wrapper, _MARK, True)
    return wrapper


def _wrap_init(init: Callable, host: compat.HostInfo) -> Callable:
    @functools.wraps(init)
    def __init__(self, hparams, *args, **kwargs):
        if not _ours(hparams):
            return init(self, hparams, *args, **kwargs)
        hparams.validate()
        given = hparams.model_name
        if isinstance(given, str):
            pair = load_model_and_tokenizer(given, hparams)
        elif isinstance(given, (tuple, list)) and len(given) == 2:
            pair = tuple(given)
            compat.give_pad_token(pair[1])  # the host pads in its pre-edit evaluation (compat fix 5)
        else:
            raise ValueError(f"hparams.model_name must be a model path or id, or a (model, tokenizer) pair; "
                             f"got {type(given).__name__}")
        validate_setup(pair[0], hparams)  # architecture and layers: a clear error before the host does anything
        hparams.model_name = pair
        try:
            with _device_context(host, hparams):
                init(self, hparams, *args, **kwargs)
        finally:
            hparams.model_name = given
        # The hosts' evaluators read model_name as a string (model_name.lower()).
        self.model_name = given if isinstance(given, str) else model_label(pair[0])

    setattr(__init__, _MARK, True)
    return __init__


def model_label(model) -> str:
    """A name for a model object, for the host's evaluators and logs."""
    config = getattr(model, "config", None)
    return (getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)


def load_model_and_tokenizer(path: str, hparams: EditHyperParams):
    """Load a causal LM and its tokenizer by local path or hub id with the plugin's loader, on the CPU (the host
    moves it to ``hparams.device``): in ``hparams.model_dtype`` (``dtype``, or float16 with EasyEdit's
    ``fp16: true``), spread with ``device_map="auto"`` under ``model_parallel: true``, as EasyEdit's loader does."""
    model, tok = load_model(path, device="cpu", dtype=hparams.model_dtype,
                            device_map="auto" if hparams.model_parallel else None,
                            trust_remote_code=hparams.trust_remote_code, field="hparams.model_name")
    compat.give_pad_token(tok)
    return model, tok
