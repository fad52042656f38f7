"""MEMIT, PRUNE and RECT in EasyEdit's ``ALG_DICT`` (idempotent, reversible).

Follows :mod:`alphaedit_plugin.easyedit.registration`: each entry becomes a
:class:`BaselineDispatcher` that chooses by the **class of the hparams
object**. The plugin's ``MEMITHyperParams`` / ``PRUNEHyperParams`` /
``RECTHyperParams`` go to the plugin; anything else (the host's own
``easyeditor.MEMITHyperParams``) goes to the host's original function,
called unchanged, so the host's MEMIT keeps working for the host's hparams.
The host has no PRUNE or RECT; for other hparams those entries raise a
``TypeError`` saying how to load the plugin's.

The plugin's hparams classes extend ``AlphaEditHyperParams``, so the
``BaseEditor`` hooks AlphaEdit's registration installs (model loading by
path, the CUDA-string fix, argument checks) apply to them as well; this
module makes sure those hooks are installed. The sequential state is kept on
the model object as for AlphaEdit, and an edit the host undoes (by restoring
the weights it was given) is taken out of the state again at the next call.
"""

from __future__ import annotations

import copy as copy_module
import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from ..alphaedit_main import validate_setup
from ..easyedit import compat
from ..easyedit import registration as alphaedit_registration
from ..easyedit.adapter import _fingerprints
from ..requests import normalise_requests
from .hparams import HPARAMS_CLASSES, BaselineHyperParams
from .memit import apply_baseline_to_model
from .state import BaselineState, baseline_identity, create_baseline_state

logger = logging.getLogger(__name__)

ALG_NAMES = tuple(cls.ALG_NAME for cls in HPARAMS_CLASSES)
SESSION_ATTR = "_alphaedit_plugin_baselines"
_MARK = "__alphaedit_plugin_baseline__"


@dataclass
class _Tracked:
    state: BaselineState
    before: Optional[Dict[int, str]] = None
    after: Optional[Dict[int, str]] = None
    undo: Optional[Dict[str, Any]] = None


@dataclass
class _Session:
    tracked: Dict[str, _Tracked] = field(default_factory=dict)


def _setting_key(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:16]


def _reconcile(model, hparams, templates, tracked: _Tracked) -> None:
    if tracked.after is None:
        return
    now = _fingerprints(model, hparams, templates)
    before, after, undo = tracked.before, tracked.after, tracked.undo
    tracked.before = tracked.after = tracked.undo = None
    if now == after:
        return
    if now == before:
        tracked.state.restore(undo)
        logger.info("%s: the host restored the weights after the last edit; it is no longer counted", hparams.label)
        return
    logger.warning("%s: the edited weights were changed outside the plugin since the last edit; keeping the state "
                   "(call alphaedit_plugin.baselines.easyedit.reset_state(model) if the earlier edits are gone)",
                   hparams.label)


def get_state(model, hparams: BaselineHyperParams) -> Optional[BaselineState]:
    """The state kept for ``model`` and this setting (None before its first edit)."""
    model = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    templates = validate_setup(model, hparams)
    session = model.__dict__.get(SESSION_ATTR)
    tracked = session.tracked.get(_setting_key(baseline_identity(model, hparams, templates))) if session else None
    if tracked is None:
        return None
    _reconcile(model, hparams, templates, tracked)
    return tracked.state


def reset_state(model) -> bool:
    """Forget every MEMIT/PRUNE/RECT state kept for ``model`` (a model or a BaseEditor)."""
    model = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    return model.__dict__.pop(SESSION_ATTR, None) is not None


def apply_baseline_easyedit(model, tok, requests, hparams: BaselineHyperParams, copy: bool = False,
                            return_orig_weights: bool = False, keep_original_weight: bool = False, *,
                            restores_only_kept_weights: bool = False, **kwargs: Any):
    """EasyEdit's ``apply_*_to_model`` contract, with the sequential state kept on the model."""
    hparams.validate()
    normalised = normalise_requests(requests)
    templates = validate_setup(model, hparams)
    if copy:
        model = copy_module.deepcopy(model)
    session = model.__dict__.setdefault(SESSION_ATTR, _Session())
    key = _setting_key(baseline_identity(model, hparams, templates))
    tracked = session.tracked.get(key)
    if tracked is None:
        tracked = _Tracked(state=create_baseline_state(model, tok, hparams))
        session.tracked[key] = tracked
    else:
        _reconcile(model, hparams, templates, tracked)
    before = _fingerprints(model, hparams, templates)
    undo = tracked.state.snapshot()
    model, weights_copy = apply_baseline_to_model(model, tok, normalised, hparams, return_orig_weights=True,
                                                  state=tracked.state)
    tracked.before, tracked.after, tracked.undo = before, _fingerprints(model, hparams, templates), undo
    give_back = keep_original_weight if restores_only_kept_weights else return_orig_weights
    return model, (weights_copy if give_back else {})


class BaselineDispatcher:
    """What ``ALG_DICT[name]`` holds for MEMIT, PRUNE and RECT once registered."""

    def __init__(self, name: str, host_apply: Optional[Callable], host: compat.HostInfo):
        self.name, self.host_apply, self.host = name, host_apply, host
        setattr(self, _MARK, True)

    def __call__(self, model, tok, requests, hparams, *args: Any, **kwargs: Any):
        if isinstance(hparams, BaselineHyperParams):
            return apply_baseline_easyedit(model, tok, requests, hparams, *args,
                                           restores_only_kept_weights=self.host.restores_only_kept_weights, **kwargs)
        if self.host_apply is not None:
            return self.host_apply(model, tok, requests, hparams, *args, **kwargs)
        raise TypeError(f"ALG_DICT[{self.name!r}] is alphaedit_plugin's {self.name} and got hparams of type "
                        f"{type(hparams).__module__}.{type(hparams).__name__}; load them with "
                        f"alphaedit_plugin.baselines.load_hparams(path)")

    def __repr__(self) -> str:
        fallback = f"the host's own {self.name}" if self.host_apply is not None else "nothing"
        return f"<alphaedit_plugin {self.name} for alphaedit_plugin hparams; other hparams go to {fallback}>"


def _table() -> dict:
    return alphaedit_registration._alg_dict()


def is_registered(name: Optional[str] = None) -> bool:
    table = _table()
    return all(getattr(table.get(n), _MARK, False) for n in ([name] if name else ALG_NAMES))


def register() -> Dict[str, BaselineDispatcher]:
    """Add MEMIT (dispatching), PRUNE and RECT to the host's ``ALG_DICT``; calling it again changes nothing."""
    alphaedit_registration.register()  # installs the BaseEditor hooks our hparams (AlphaEdit subclasses) use
    table = _table()
    host = compat.inspect_host()
    result = {}
    for name in ALG_NAMES:
        entry = table.get(name)
        if not getattr(entry, _MARK, False):
            entry = BaselineDispatcher(name, entry, host)
            table[name] = entry
        result[name] = entry
    _allow_batch_editing()
    return result


def unregister() -> bool:
    """Put the host's entries back (and remove the names it did not have). True if anything changed."""
    table = _table()
    changed = False
    for name in ALG_NAMES:
        entry = table.get(name)
        if getattr(entry, _MARK, False):
            if entry.host_apply is not None:
                table[name] = entry.host_apply
            else:
                del table[name]
            changed = True
    _undo_batch_editing()
    return changed


def _allow_batch_editing() -> None:
    """The PyPI host's ``BatchEditor.is_batchable_method`` lists MEMIT but not PRUNE or RECT.

    The patch sits on top of AlphaEdit's (compat.allow_batch_editing) and, like it, carries compat's mark
    and ``__wrapped__`` pointing at the host's own function, so ``compat.inspect_host`` still reads the
    host's answer and ``compat.undo_batch_editing`` removes both.
    """
    from easyeditor.editors.batch_editor import BatchEditor

    current = BatchEditor.is_batchable_method
    if getattr(current, _MARK, False) or all(current(n) for n in ALG_NAMES):
        return
    host_original = current
    while getattr(host_original, compat._PATCH_MARK, False) and hasattr(host_original, "__wrapped__"):
        host_original = host_original.__wrapped__

    @functools.wraps(host_original)
    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in ALG_NAMES or current(alg_name)

    setattr(is_batchable_method, compat._PATCH_MARK, True)
    setattr(is_batchable_method, _MARK, True)
    is_batchable_method._previous = current
    BatchEditor.is_batchable_method = staticmethod(is_batchable_method)


def _undo_batch_editing() -> None:
    from easyeditor.editors.batch_editor import BatchEditor

    current = BatchEditor.is_batchable_method
    if getattr(current, _MARK, False):
        BatchEditor.is_batchable_method = staticmethod(current._previous)
