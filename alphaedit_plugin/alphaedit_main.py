"""AlphaEdit: execute (compute the per-layer updates) and apply (write them).

``execute_alphaedit`` works on the live model because MEMIT-style editing
spreads the residual over layers, and each layer's keys depend on the updates
already made below it; it restores every weight before it returns, success
or failure. ``apply_alphaedit_to_model`` then writes the updates with the
very same additions, so the result is bit-identical, and commits the
sequential state only once every layer has been written.
"""

from __future__ import annotations

import copy as copy_module
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .architectures import (ModuleTemplates, UnknownArchitectureError, add_to_weight, get_module, is_transposed,
                            num_layers, templates_for)
from .compute_keys import compute_keys_and_values
from .compute_targets import TargetSearchResult, compute_target_values
from .context_templates import generate_context_templates
from .corpus import corpus_identity
from .hparams import AlphaEditHyperParams
from .nullspace import model_identity, prepare_null_spaces
from .requests import EditRequest, normalise_requests
from .solve import constrained_update, preservation_ratio
from .state import AlphaEditState, EditRecord

logger = logging.getLogger(__name__)


class EditError(RuntimeError):
    """An edit could not be computed; the model's weights are unchanged."""


@dataclass
class AlphaEditUpdate:
    deltas: Dict[int, torch.Tensor]  # (out, in) update per layer
    keys: Dict[int, torch.Tensor]  # (n, d_in) keys K1 per layer
    targets: TargetSearchResult


def validate_setup(model, hparams: AlphaEditHyperParams) -> ModuleTemplates:
    """Check layers and module templates against the model before anything runs."""
    templates = templates_for(model, hparams)
    total = num_layers(model)
    bad = [layer for layer in hparams.layers if layer >= total]
    if bad:
        raise ValueError(f"layers {bad} are outside the model, which has blocks 0..{total - 1}")
    if hparams.v_loss_layer >= total:
        raise ValueError(f"v_loss_layer {hparams.v_loss_layer} is outside the model, which has blocks 0..{total - 1}")
    def module_of(field_name: str, layer: int):
        template = getattr(templates, field_name)
        try:
            return get_module(model, template.format(layer))
        except UnknownArchitectureError as error:
            raise UnknownArchitectureError(f"{field_name} {template!r} matches nothing at layer {layer}: {error}") from None

    for layer in hparams.layers:
        module = module_of("rewrite_module_tmp", layer)
        if not hasattr(module, "weight") or module.weight.ndim != 2:
            raise ValueError(f"rewrite_module_tmp {templates.rewrite_module_tmp!r} names {type(module).__name__} at "
                             f"layer {layer}, which has no 2-D weight")
        module_of("layer_module_tmp", layer)
    get_module(model, templates.ln_f_module)
    get_module(model, templates.lm_head_module)
    return templates


def state_identity(model, hparams: AlphaEditHyperParams, templates: ModuleTemplates) -> Dict[str, Any]:
    return {
        "model": model_identity(model, hparams),
        "layers": list(hparams.layers),
        "rewrite_module_tmp": templates.rewrite_module_tmp,
        "nullspace_threshold": hparams.nullspace_threshold,
        "mom2": corpus_identity(hparams.mom2_dataset, hparams.mom2_max_tokens, hparams.seed),
        "mom2_n_samples": hparams.mom2_n_samples,
    }


def create_state(model, tok, hparams: AlphaEditHyperParams) -> AlphaEditState:
    """A fresh sequential-editing state: projectors (from the cache or computed) and context prefixes."""
    templates = validate_setup(model, hparams)
    null_spaces = prepare_null_spaces(model, tok, hparams, templates)
    context_templates = generate_context_templates(model, tok, hparams.context_template_count,
                                                   hparams.context_template_length, hparams.seed)
    device = next(model.parameters()).device
    return AlphaEditState(identity=state_identity(model, hparams, templates), null_spaces=null_spaces,
                          context_templates=context_templates).to(device)


def execute_alphaedit(model, tok, requests: Sequence[EditRequest], hparams: AlphaEditHyperParams,
                      state: AlphaEditState) -> AlphaEditUpdate:
    """Compute the update of every edited layer; the model's weights are left exactly as found."""
    templates = validate_setup(model, hparams)
    modules = {layer: get_module(model, templates.rewrite_module_tmp.format(layer)) for layer in hparams.layers}
    originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}
    value_layer = hparams.layers[-1]
    deltas: Dict[int, torch.Tensor] = {}
    layer_keys: Dict[int, torch.Tensor] = {}
    try:
        targets = compute_target_values(model, tok, requests, hparams, templates, value_layer, state.context_templates)
        for position, layer in enumerate(hparams.layers):
            keys, current = compute_keys_and_values(model, tok, requests, templates, layer, value_layer,
                                                    state.context_templates, hparams.fact_token)
            # Spread what is still missing evenly over this and the remaining layers (MEMIT Eq. 20).
            residual = (targets.values - current) / (len(hparams.layers) - position)
            delta = constrained_update(
                keys=keys.T,
                residuals=residual.T,
                projector=state.null_spaces[layer].projector,
                previous_keys_cov=state.previous_keys_cov[layer],
                l2=hparams.L2,
            )
            if not torch.isfinite(delta).all():
                raise FloatingPointError(f"layer {layer}: the solve produced NaN or inf")
            add_to_weight(modules[layer], delta)
            deltas[layer] = delta
            layer_keys[layer] = keys
    except Exception as error:
        raise EditError(f"AlphaEdit failed, weights unchanged: {type(error).__name__}: {error}") from error
    finally:
        with torch.no_grad():
            for layer, module in modules.items():
                module.weight.copy_(originals[layer])
    return AlphaEditUpdate(deltas=deltas, keys=layer_keys, targets=targets)


def edited_weights_copy(model, templates: ModuleTemplates, layers: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Copies of the weights an edit changes, by parameter name (EasyEdit's ``weights_copy``)."""
    return {f"{templates.rewrite_module_tmp.format(layer)}.weight":
            get_module(model, templates.rewrite_module_tmp.format(layer)).weight.detach().clone() for layer in layers}


def edit_in_place(model, tok, requests: Sequence[EditRequest], hparams: AlphaEditHyperParams,
                  state: AlphaEditState) -> AlphaEditUpdate:
    """Compute and write one batch of edits, then record it in ``state``; returns the update.

    Atomic: if anything fails, every weight is exactly as before and the
    state is unchanged. ``requests`` are normalised, the state made for this
    model (see :func:`apply_alphaedit_to_model`, which checks both).
    """
    started = time.perf_counter()
    templates = templates_for(model, hparams)
    modules = {layer: get_module(model, templates.rewrite_module_tmp.format(layer)) for layer in hparams.layers}
    update = execute_alphaedit(model, tok, requests, hparams, state)
    originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}
    before = {layer: originals[layer].T if is_transposed(module) else originals[layer]  # (out, in)
              for layer, module in modules.items()}
    try:
        for layer in hparams.layers:
            add_to_weight(modules[layer], update.deltas[layer])
            if not torch.isfinite(modules[layer].weight).all():
                raise FloatingPointError(f"layer {layer}: the edited weight holds NaN or inf")
    except Exception as error:
        with torch.no_grad():
            for layer, module in modules.items():
                module.weight.copy_(originals[layer])
        raise EditError(f"AlphaEdit failed while writing, weights unchanged: {error}") from error

    for layer in hparams.layers:
        keys = update.keys[layer].to(state.previous_keys_cov[layer])
        state.previous_keys_cov[layer] += keys.T @ keys
    preservation = {}
    for layer in hparams.layers:
        heldout = state.null_spaces[layer].heldout_keys
        if heldout is not None:
            preservation[layer] = preservation_ratio(update.deltas[layer], before[layer], heldout.to(before[layer].device))
    seconds = time.perf_counter() - started
    state.edit_log.append(EditRecord(
        requests=[r.as_dict() for r in requests],
        update_norms={layer: float(d.norm()) for layer, d in update.deltas.items()},
        preservation=preservation,
        target_probability=update.targets.target_probability,
        seconds=seconds,
    ))
    logger.info("AlphaEdit: %d request(s) in %.1f s; update norms %s; preservation ‖ΔK0‖/‖WK0‖ %s",
                len(requests), seconds, {l: round(v, 3) for l, v in state.edit_log[-1].update_norms.items()},
                {l: f"{v:.2e}" for l, v in preservation.items()})
    return update


def apply_alphaedit_to_model(
    model,
    tok,
    requests: Sequence[Mapping],
    hparams: AlphaEditHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    state: Optional[AlphaEditState] = None,
    **kwargs: Any,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Edit ``model`` so that each request's prompt continues with its new target.

    The EasyEdit contract: returns ``(model, weights_copy)``, where
    ``weights_copy`` maps parameter names to their original values when
    ``return_orig_weights`` is set. ``state`` carries projectors and earlier
    edits' keys across sequential calls; without one a fresh state is made
    (from the on-disk cache) and the edit is treated as the first.
    ``keep_original_weight`` and other EasyEdit keywords are accepted; the
    host restores weights itself when it asks for that.

    Atomic: if anything fails, every weight is exactly as before and the
    state is unchanged.
    """
    normalised = normalise_requests(requests)
    templates = validate_setup(model, hparams)
    if copy:
        model = copy_module.deepcopy(model)
    if state is None:
        state = create_state(model, tok, hparams)
    else:
        state.check_compatible(state_identity(model, hparams, templates))
    weights_copy = edited_weights_copy(model, templates, hparams.layers) if return_orig_weights else {}
    edit_in_place(model, tok, normalised, hparams, state)
    return model, weights_copy
