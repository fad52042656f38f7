"""EasyEdit's entry points for AlphaEdit: ``execute_alphaedit`` (computes) and ``apply_alphaedit_to_model`` (writes).

Both are the edit loop's, called with AlphaEdit's hyperparameters; any other
registered method runs through :func:`alphaedit_plugin.apply_to_model`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ...edit_loop import LayerUpdates, apply_to_model, compute_update, edit_lock, editing_modes
from ...requests import EditRequest, normalise_requests
from ...state import EditingState
from .hparams import AlphaEditHyperParams


def _check(hparams: Any, function: str) -> None:
    if not isinstance(hparams, AlphaEditHyperParams):
        raise TypeError(f"{function} needs alphaedit_plugin.AlphaEditHyperParams, got "
                        f"{type(hparams).__module__}.{type(hparams).__qualname__}; for another method use "
                        "alphaedit_plugin.apply_to_model")


def execute_alphaedit(model, tok, requests: Sequence[EditRequest], hparams: AlphaEditHyperParams,
                      state: EditingState) -> LayerUpdates:
    """Compute the update of every edited layer; the model's weights are left exactly as found."""
    _check(hparams, "execute_alphaedit")
    hparams.validate()
    with edit_lock(model), editing_modes(model):
        return compute_update(model, tok, normalise_requests(requests), hparams, state)


def apply_alphaedit_to_model(
    model,
    tok,
    requests: Sequence[Mapping],
    hparams: AlphaEditHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    state: Optional[EditingState] = None,
    **kwargs: Any,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Edit ``model`` with AlphaEdit so that each request's prompt continues with its new target.

    The EasyEdit contract: returns ``(model, weights_copy)``; see :func:`alphaedit_plugin.apply_to_model`.
    Pass the same ``state`` to later edits (sequential editing). Atomic: if anything fails, every weight
    is exactly as before and the state is unchanged.
    """
    _check(hparams, "apply_alphaedit_to_model")
    return apply_to_model(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                          keep_original_weight=keep_original_weight, state=state, **kwargs)
