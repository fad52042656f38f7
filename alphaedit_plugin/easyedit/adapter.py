"""The function EasyEdit calls, and the sequential state it keeps per model.

``BaseEditor`` calls ``ALG_DICT["AlphaEdit"](model, tok, requests, hparams,
copy=False, return_orig_weights=True, keep_original_weight=..., train_ds=None)``
once per request (``edit``) or per chunk (``batch_edit``). AlphaEdit needs what
earlier edits left behind (their keys ``Kp Kpᵀ`` and the projectors), so an
:class:`~alphaedit_plugin.state.AlphaEditState` is kept **on the model object**
(attribute ``_alphaedit_plugin_session``): it lives and dies with the model,
follows a ``deepcopy``, and two models never share one. No module globals.

The host may undo an edit right after evaluating it (the current EasyEdit's
``edit(sequential_edit=False)``, the PyPI host's ``keep_original_weight=True``)
without telling the editor. So each call remembers a fingerprint of the edited
weights before and after, plus the edit's keys; at the next call (or
:func:`get_state`) the weights are compared:

- unchanged since our edit: the edit stays in the state (sequential editing);
- back to what they were before it: the host undid it, so its ``Kp Kpᵀ`` and
  log entry are taken out again;
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

from ..alphaedit_main import create_state, edit_in_place, edited_weights_copy, state_identity, validate_setup
from ..architectures import get_module
from ..hparams import AlphaEditHyperParams
from ..requests import normalise_requests
from ..state import AlphaEditState

logger = logging.getLogger(__name__)

SESSION_ATTR = "_alphaedit_plugin_session"


@dataclass
class _LastEdit:
    before: Dict[int, str]  # fingerprints of the edited weights before the edit
    after: Dict[int, str]  # ... and right after it
    keys: Dict[int, torch.Tensor]  # K1 per layer, to take the edit out of Kp Kpᵀ again


@dataclass
class _Tracked:
    state: AlphaEditState
    last_edit: Optional[_LastEdit] = None


@dataclass
class EditingSession:
    """The AlphaEdit states of one model, one per setting (layers, corpus, threshold...)."""

    tracked: Dict[str, _Tracked] = field(default_factory=dict)


# ---------------------------------------------------------------------------
def _fingerprints(model, hparams: AlphaEditHyperParams, templates) -> Dict[int, str]:
    result = {}
    for layer in hparams.layers:
        weight = get_module(model, templates.rewrite_module_tmp.format(layer)).weight.detach()
        data = weight.to("cpu").contiguous().view(torch.uint8).numpy()
        result[layer] = hashlib.sha256(data.tobytes()).hexdigest()
    return result


def _setting_key(model, hparams: AlphaEditHyperParams, templates) -> str:
    identity = state_identity(model, hparams, templates)
    return hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:16]


def _session(model, create: bool) -> Optional[EditingSession]:
    session = model.__dict__.get(SESSION_ATTR)
    if session is None and create:
        session = EditingSession()
        model.__dict__[SESSION_ATTR] = session  # plain attribute: not a parameter, not in state_dict
    return session


def _reconcile(model, hparams: AlphaEditHyperParams, templates, tracked: _Tracked) -> None:
    """Bring the state in line with what happened to the weights since our last edit."""
    last = tracked.last_edit
    if last is None:
        return
    tracked.last_edit = None
    now = _fingerprints(model, hparams, templates)
    if now == last.after:
        return  # the edit is still in the model: keep it (sequential editing)
    state = tracked.state
    if now == last.before:
        for layer, keys in last.keys.items():
            cov = state.previous_keys_cov[layer]
            keys = keys.to(cov)
            cov -= keys.T @ keys
        if state.edit_log:
            state.edit_log.pop()
        logger.info("AlphaEdit: the host restored the weights after the last edit; it is no longer counted "
                    "as an earlier edit (%d edit(s) remain in the state)", state.edits_applied)
        return
    logger.warning("AlphaEdit: the edited layers' weights were changed outside AlphaEdit since the last edit; "
                   "keeping the editing state of %d earlier edit(s). Call "
                   "alphaedit_plugin.easyedit.reset_state(model) if the earlier edits are gone.",
                   state.edits_applied)


def _tracked_state(model, tok, hparams: AlphaEditHyperParams, templates, create: bool = True) -> Optional[_Tracked]:
    session = _session(model, create)
    if session is None:
        return None
    key = _setting_key(model, hparams, templates)
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
def get_state(model, hparams: AlphaEditHyperParams) -> Optional[AlphaEditState]:
    """The sequential state the EasyEdit adapter keeps for ``model`` and this setting (None before any edit)."""
    model = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    templates = validate_setup(model, hparams)
    tracked = _tracked_state(model, None, hparams, templates, create=False)
    return None if tracked is None else tracked.state


def reset_state(model) -> bool:
    """Forget every AlphaEdit state kept for ``model`` (a model or a ``BaseEditor``); True if there was one.

    The weights are not touched: restore them yourself if you want the edits gone too.
    """
    model = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    return model.__dict__.pop(SESSION_ATTR, None) is not None


def apply_alphaedit_easyedit(
    model,
    tok,
    requests: Sequence[Mapping],
    hparams: AlphaEditHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    *,
    restores_only_kept_weights: bool = False,
    **kwargs: Any,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Edit as EasyEdit's ``apply_*_to_model`` contract asks; the state is kept on the model.

    ``restores_only_kept_weights`` (set by the registry from the detected host):
    the PyPI host restores from any ``weights_copy`` it receives, so one is
    returned only when the caller asked to keep the original weights
    (``keep_original_weight=True``), as its own editors do. Otherwise
    ``weights_copy`` follows ``return_orig_weights``.

    Everything is checked (hparams type, requests, architecture, layers)
    before any weight changes; an edit that fails leaves weights and state as
    they were.
    """
    if not isinstance(hparams, AlphaEditHyperParams):
        raise TypeError(f"alphaedit_plugin's AlphaEdit needs alphaedit_plugin.AlphaEditHyperParams, "
                        f"got {type(hparams).__module__}.{type(hparams).__name__}")
    hparams.validate()
    normalised = normalise_requests(requests)
    templates = validate_setup(model, hparams)
    if copy:
        model = copy_module.deepcopy(model)  # the copy carries a copy of the state, the original keeps its own
    tracked = _tracked_state(model, tok, hparams, templates)
    before = _fingerprints(model, hparams, templates)
    weights_copy = edited_weights_copy(model, templates, hparams.layers)
    update = edit_in_place(model, tok, normalised, hparams, tracked.state)
    keys = update.keys  # what each layer's update was solved for, to take the edit out again
    tracked.last_edit = _LastEdit(before=before, after=_fingerprints(model, hparams, templates), keys=keys)
    give_back = keep_original_weight if restores_only_kept_weights else return_orig_weights
    return model, (weights_copy if give_back else {})
