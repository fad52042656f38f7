"""Registering AlphaEdit in EasyEdit's ``ALG_DICT`` (idempotent, reversible).

The rule when the host already has an editor called "AlphaEdit" (the current
EasyEdit source ships its own): ``ALG_DICT["AlphaEdit"]`` becomes an
:class:`AlphaEditDispatcher` that chooses by the **type of the hparams
object** -- ``alphaedit_plugin.AlphaEditHyperParams`` goes to the plugin,
anything else (the host's own ``easyeditor.AlphaEditHyperParams``) to the
host's original function, which the dispatcher keeps and calls unchanged.
Both yaml files say ``alg_name: AlphaEdit``; the class that read the file
decides. :func:`unregister` puts the host's entry back.

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
from typing import Any, Callable, Optional

import torch

from ..alphaedit_main import validate_setup
from ..hparams import AlphaEditHyperParams
from . import compat
from .adapter import apply_alphaedit_easyedit

logger = logging.getLogger(__name__)

ALG_NAME = compat.ALG_NAME
_MARK = "__alphaedit_plugin_patch__"
_WRAPPED_METHODS = ("edit", "batch_edit", "edit_dataset", "edit_requests", "normal_edit", "generate_edit")


class AlphaEditDispatcher:
    """What ``ALG_DICT["AlphaEdit"]`` holds once the plugin is registered."""

    def __init__(self, host_apply: Optional[Callable], host: compat.HostInfo):
        self.host_apply = host_apply  # the host's own AlphaEdit, or None
        self.host = host
        setattr(self, _MARK, True)

    def __call__(self, model, tok, requests, hparams, *args: Any, **kwargs: Any):
        if isinstance(hparams, AlphaEditHyperParams):
            return apply_alphaedit_easyedit(model, tok, requests, hparams, *args,
                                            restores_only_kept_weights=self.host.restores_only_kept_weights, **kwargs)
        if self.host_apply is not None:
            return self.host_apply(model, tok, requests, hparams, *args, **kwargs)
        raise TypeError(
            f"ALG_DICT['AlphaEdit'] is alphaedit_plugin's editor and got hparams of type "
            f"{type(hparams).__module__}.{type(hparams).__name__}; load them with "
            "alphaedit_plugin.AlphaEditHyperParams.from_hparams(path)")

    def __repr__(self) -> str:
        fallback = "the host's own AlphaEdit" if self.host_apply is not None else "nothing"
        return f"<alphaedit_plugin AlphaEdit for alphaedit_plugin hparams; other hparams go to {fallback}>"


# ---------------------------------------------------------------------------
def _alg_dict() -> dict:
    try:
        from easyeditor.util import alg_dict
    except ImportError as error:
        raise ImportError(
            "alphaedit_plugin.easyedit needs the EasyEdit host package `easyeditor` "
            f"({type(error).__name__}: {error}). Install it with scripts/setup_easyedit_env.sh "
            "(PyPI easyeditor==0.0.1.dev0 with transformers 4.46), or put a checkout of the EasyEdit "
            "source on PYTHONPATH") from error
    return alg_dict.ALG_DICT


def registered_dispatcher() -> Optional[AlphaEditDispatcher]:
    entry = _alg_dict().get(ALG_NAME)
    return entry if getattr(entry, _MARK, False) else None


def is_registered() -> bool:
    return registered_dispatcher() is not None


def register() -> AlphaEditDispatcher:
    """Add AlphaEdit to ``easyeditor.util.alg_dict.ALG_DICT``; calling it again changes nothing."""
    table = _alg_dict()
    existing = registered_dispatcher()
    if existing is not None:
        return existing
    host = compat.inspect_host()
    dispatcher = AlphaEditDispatcher(table.get(ALG_NAME), host)
    _install_editor_hooks(dispatcher)
    if not host.lists_alphaedit_as_batchable:
        compat.allow_batch_editing()
    table[ALG_NAME] = dispatcher
    logger.info("alphaedit_plugin: registered AlphaEdit in easyeditor %s (%s)", host.version,
                "dispatching by hparams type next to the host's own AlphaEdit" if host.has_own_alphaedit
                else "new entry")
    return dispatcher


def unregister() -> bool:
    """Undo :func:`register`: the host's own entry (if any) and methods come back. True if anything changed."""
    table = _alg_dict()
    dispatcher = registered_dispatcher()
    if dispatcher is None:
        return False
    if dispatcher.host_apply is not None:
        table[ALG_NAME] = dispatcher.host_apply
    else:
        del table[ALG_NAME]
    _remove_editor_hooks()
    compat.undo_batch_editing()
    return True


# ---------------------------------------------------------------------------
def _editor_class():
    from easyeditor.editors.editor import BaseEditor
    return BaseEditor


def _ours(hparams) -> bool:
    return isinstance(hparams, AlphaEditHyperParams)


def _install_editor_hooks(dispatcher: AlphaEditDispatcher) -> None:
    editor_cls = _editor_class()
    host = dispatcher.host
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


def load_model_and_tokenizer(path: str, hparams: AlphaEditHyperParams):
    """Load a causal LM and its tokenizer from a local path (or a cached hub id) in float32."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    major = int(transformers.__version__.split(".")[0])
    dtype_arg = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    device_map = "auto" if hparams.model_parallel else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **dtype_arg).eval()
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"hparams.model_name {path!r}: cannot load a causal language model and tokenizer "
                         f"from it ({type(error).__name__}: {error})") from error
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
