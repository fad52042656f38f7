"""The function EasyEdit calls for every method of the plugin, and the editing states it keeps per model.

``BaseEditor`` calls ``ALG_DICT[name](model, tok, requests, hparams, copy=False,
return_orig_weights=True, keep_original_weight=..., train_ds=None)`` once per
request (``edit``) or per chunk (``batch_edit``). The methods need what earlier
edits left behind (their keys, PRUNE's running totals), so an
:class:`~alphaedit_plugin.state.EditingState` per setting (method, layers,
corpus, threshold, ...) is kept **on the model object**, in one attribute
(``_alphaedit_plugin_states``): it lives and dies with the model, follows a
``deepcopy``, and two models never share one. No module globals.

The host may undo an edit right after evaluating it (the current EasyEdit's
``edit(sequential_edit=False)``, the PyPI host's ``keep_original_weight=True``)
without telling the editor. So each call remembers a fingerprint of the edited
weights before and after; at the next call (or :func:`get_state`) the weights
are compared:

- unchanged since our edit: the edit stays in the state (sequential editing);
- back to what they were before it: the host undid it, so the state takes it
  out again (:meth:`~alphaedit_plugin.state.EditingState.undo_last`);
- anything else: someone else changed them; a warning is logged and the
  state is kept.

:func:`reset_state` forgets everything (use it when you restore or swap the
weights yourself).
"""

from __future__ import annotations

import copy as copy_module
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ... import registry
from ...architectures import get_module
from ...cache import tensor_sha256
from ...edit_loop import (check_positions_before_statistics, create_state, edit_in_place, edited_weights_copy,
                          state_identity, validate_setup)
from ...hparams import EditHyperParams
from ...requests import normalise_requests
from ...state import EditingState

logger = logging.getLogger(__name__)

STATES_ATTR = "_alphaedit_plugin_states"
# Attributes earlier versions kept editing state in (one per method family); reset_state clears them too.
_LEGACY_ATTRS = ("_alphaedit_plugin_session", "_alphaedit_plugin_baselines")


@dataclass
class _Tracked:
    state: EditingState
    before: Optional[Dict[int, str]] = None  # fingerprints of the edited weights before our last edit
    after: Optional[Dict[int, str]] = None  # ... and right after it


@dataclass
class EditingSession:
    """The editing states of one model, one per setting."""

    tracked: Dict[str, _Tracked] = field(default_factory=dict)


# ---------------------------------------------------------------------------
def fingerprints(model, hparams, templates) -> Dict[int, str]:
    """A hash of each edited layer's weight, to tell whether the host restored it since our last edit."""
    return {layer: tensor_sha256(get_module(model, templates.rewrite_module_tmp.format(layer)).weight)
            for layer in hparams.layers}


def _setting_key(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:16]


def _model_of(model_or_editor):
    return model_or_editor if isinstance(model_or_editor, torch.nn.Module) else getattr(model_or_editor, "model",
                                                                                          model_or_editor)


def _session(model, create: bool) -> Optional[EditingSession]:
    session = model.__dict__.get(STATES_ATTR)
    if session is None and create:
        session = EditingSession()
        model.__dict__[STATES_ATTR] = session  # plain attribute: not a parameter, not in state_dict
    return session


def _reconcile(model, hparams, templates, tracked: _Tracked) -> None:
    """Bring the state in line with what happened to the weights since our last edit."""
    if tracked.after is None:
        return
    before, after = tracked.before, tracked.after
    tracked.before = tracked.after = None
    now = fingerprints(model, hparams, templates)
    if now == after:
        return  # the edit is still in the model: keep it (sequential editing)
    state = tracked.state
    if now == before and state.undo_last():
        logger.info("%s: the host restored the weights after the last edit; it is no longer counted as an earlier "
                    "edit (%d edit(s) remain in the state)", hparams.label, state.edits_applied)
        return
    logger.warning("%s: the edited layers' weights were changed outside the plugin since the last edit; keeping the "
                   "editing state of %d earlier edit(s). Call alphaedit_plugin.hosts.easyedit.reset_state(model) if "
                   "the earlier edits are gone.", hparams.label, state.edits_applied)


def _tracked_state(model, tok, hparams, templates, create: bool = True) -> Optional[_Tracked]:
    session = _session(model, create)
    if session is None:
        return None
    key = _setting_key(state_identity(model, hparams, templates))
    tracked = session.tracked.get(key)
    if tracked is None:
        if not create:
            return None
        tracked = _Tracked(state=create_state(model, tok, hparams))
        session.tracked[key] = tracked
    else:
        _reconcile(model, hparams, templates, tracked)
    return tracked


# ---------------------------------------------------------------------------
def get_state(model, hparams) -> Optional[EditingState]:
    """The state the EasyEdit adapter keeps for ``model`` (or a BaseEditor) and this setting; None before its
    first edit."""
    model = _model_of(model)
    templates = validate_setup(model, hparams)
    tracked = _tracked_state(model, None, hparams, templates, create=False)
    return None if tracked is None else tracked.state


def reset_state(model) -> bool:
    """Forget every editing state kept for ``model`` (a model or a ``BaseEditor``); True if there was one.

    The weights are not touched: restore them yourself if you want the edits gone too.
    """
    model = _model_of(model)
    found = False
    for name in (STATES_ATTR,) + _LEGACY_ATTRS:
        found = model.__dict__.pop(name, None) is not None or found
    return found


def apply_easyedit(
    model,
    tok,
    requests: Sequence[Mapping],
    hparams: EditHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    *,
    restores_only_kept_weights: bool = False,
    **kwargs: Any,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Edit as EasyEdit's ``apply_*_to_model`` contract asks, with any registered method; the state is kept on
    the model.

    ``restores_only_kept_weights`` (set by the dispatcher from the detected host): the PyPI host restores
    from any ``weights_copy`` it receives, so one is returned only when the caller asked to keep the
    original weights (``keep_original_weight=True``), as its own editors do. Otherwise ``weights_copy``
    follows ``return_orig_weights``.

    Everything is checked (hparams, requests, architecture, layers) before any weight changes; an edit
    that fails leaves weights and state as they were.
    """
    method = registry.method_for(hparams)
    hparams.validate()
    normalised = normalise_requests(requests)
    templates = validate_setup(model, hparams)
    if copy:
        model = copy_module.deepcopy(model)  # the copy carries a copy of the states, the original keeps its own
    check_positions_before_statistics(model, tok, normalised, hparams)
    tracked = _tracked_state(model, tok, hparams, templates)
    before = fingerprints(model, hparams, templates)
    weights_copy = edited_weights_copy(model, templates, hparams.layers)
    edit_in_place(model, tok, normalised, hparams, tracked.state, method, templates)
    tracked.before, tracked.after = before, fingerprints(model, hparams, templates)
    give_back = keep_original_weight if restores_only_kept_weights else return_orig_weights
    return model, (weights_copy if give_back else {})


# The name earlier versions gave it (AlphaEdit only).
apply_alphaedit_easyedit = apply_easyedit
