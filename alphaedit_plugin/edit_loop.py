"""The one edit loop: every method computes and applies its edits here.

:func:`compute_update` works on the live model, because MEMIT-style editing
spreads the residual over layers and each layer's keys depend on the updates
already made below it; it restores every weight before it returns, success
or failure. :func:`apply_update` then writes the update with the very same
additions, checks that every written weight is finite, and commits the
state last, so an edit is atomic: whatever fails or interrupts it (an
exception, ``KeyboardInterrupt``), the weights and the state are either as
before or as after the whole edit.

A method (:mod:`alphaedit_plugin.methods`) supplies only what differs; the
solve, where the null-space projection P enters for every "+P" method, is
:func:`solve_layer`.
"""

from __future__ import annotations

import copy as copy_module
import logging
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from . import registry
from .architectures import (ModuleTemplates, UnknownArchitectureError, add_to_weight, get_module, num_layers,
                            templates_for, weight_as_out_in)
from .compute_targets import TargetSearchResult
from .constrained_solve import preservation_ratio, solve_with_terms
from .context_templates import generate_context_templates
from .corpus import corpus_identity, max_positions
from .edit_outcome import achieved_probabilities, key_energies, took, why_not_taken
from .errors import DeltaError, EditError
from .layer_statistics import (load_or_compute_null_spaces, load_second_moments, model_identity, null_space_energy,
                               unedited_weights_fingerprint)
from .layer_spreading import spread_residual
from .methods.base import EditMethod
from .projector_file import file_identity, load_projector_file
from .requests import EditRequest, RequestError, normalise_requests
from .run_settings import check_weights_in_memory
from .state import EditingState, EditRecord
from .tracing import encode

logger = logging.getLogger(__name__)


@dataclass
class LayerUpdates:
    """What one edit computed: per layer the update Δ (out, in), the keys K1 (n, d_in), and the targets."""

    deltas: Dict[int, torch.Tensor]
    keys: Dict[int, torch.Tensor]
    targets: TargetSearchResult


# ---------------------------------------------------------------------------
# Checks and the state
# ---------------------------------------------------------------------------
def validate_setup(model, hparams) -> ModuleTemplates:
    """Check layers and module templates against the model before anything runs; returns the templates."""
    check_weights_in_memory(model)
    templates = templates_for(model, hparams)
    total = num_layers(model)
    bad = [layer for layer in hparams.layers if layer >= total]
    if bad:
        raise ValueError(f"layers {bad} are outside the model, which has blocks 0..{total - 1}")
    if hparams.v_loss_layer >= total:
        raise ValueError(f"v_loss_layer {hparams.v_loss_layer} is outside the model, which has blocks 0..{total - 1}")
    loss_layer = hparams.v_loss_layer if hparams.v_loss_layer >= 0 else total + hparams.v_loss_layer
    if loss_layer < 0:
        raise ValueError(f"v_loss_layer {hparams.v_loss_layer} is outside the model, which has blocks 0..{total - 1} "
                         "(-1 is the last)")
    if loss_layer < hparams.layers[-1]:
        raise ValueError(f"v_loss_layer {hparams.v_loss_layer} (block {loss_layer}) is below the last edited layer "
                         f"{hparams.layers[-1]}: the target is read at or above the block its value is searched at; "
                         "use -1 (the last block) or a block >= the last edited layer")

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
        outputs, hidden = weight_as_out_in(module).shape[0], hidden_size(model)
        if hidden is not None and outputs != hidden:
            raise ValueError(f"rewrite_module_tmp {templates.rewrite_module_tmp!r} names a module with {outputs} outputs "
                             f"at layer {layer}; the edited module must write the block's hidden state ({hidden} "
                             "outputs): the MLP's output projection (e.g. mlp.c_proj, mlp.down_proj)")
        module_of("layer_module_tmp", layer)
    get_module(model, templates.ln_f_module)
    get_module(model, templates.lm_head_module)
    return templates


def projector_file(hparams) -> Optional[Path]:
    """The ``P_loc`` file the projectors come from, or None (no ``P_loc``, or no file there: P is computed)."""
    if hparams.P_loc is None:
        return None
    path = Path(hparams.P_loc).expanduser()
    return path if path.is_file() else None


def hidden_size(model) -> Optional[int]:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def state_identity(model, hparams, templates: ModuleTemplates, method: Optional[EditMethod] = None) -> Dict[str, Any]:
    """What a state belongs to: the method, the model, the edited layers and module, the corpus and threshold
    (or the ``P_loc`` file the projectors came from)."""
    method = method or registry.method_for(hparams)
    from_file = projector_file(hparams)
    extra = {"projector_file": file_identity(from_file)} if from_file is not None else {}
    return {
        "method": method.label,
        "model": model_identity(model, hparams),
        "layers": list(hparams.layers),
        "rewrite_module_tmp": templates.rewrite_module_tmp,
        "nullspace_threshold": hparams.nullspace_threshold,
        # only under the energy rule: the identities of states made under the paper's rule stay as they were
        **({"nullspace_energy": energy} if (energy := null_space_energy(hparams)) is not None else {}),
        "mom2": corpus_identity(hparams.mom2_dataset, hparams.mom2_max_tokens, hparams.seed),
        "mom2_n_samples": hparams.mom2_n_samples,
        "unedited_weights": unedited_weights_fingerprint(model, templates, hparams.layers),
        **method.identity(),
        **extra,
    }


def state_device(model, hparams) -> torch.device:
    """Where an editing state's per-layer matrices live between edits: the CPU with ``offload_editing_state``,
    else the device of the model's first parameter. Each layer's solve copies what it needs to the layer's
    own device (constrained_solve.py), so a model spread over devices edits either way."""
    return torch.device("cpu") if hparams.offload_editing_state else next(model.parameters()).device


def edited_modules(model, hparams, templates: ModuleTemplates) -> Dict[int, torch.nn.Module]:
    return {layer: get_module(model, templates.rewrite_module_tmp.format(layer)) for layer in hparams.layers}


def create_state(model, tok, hparams) -> EditingState:
    """A fresh editing state for ``hparams``' method: projectors and held-out keys (cached on disk), the
    context prefixes, C0 where the method's solve has MEMIT's prior, and what the method keeps of the
    unedited weights."""
    method = registry.method_for(hparams)
    hparams.validate()
    templates = validate_setup(model, hparams)
    _note_dtype_mismatch(model, hparams)
    with editing_modes(model):
        return _create_state(model, tok, hparams, method, templates)


def _note_dtype_mismatch(model, hparams) -> None:
    """The hparams' dtype only says how a model is loaded; a model given in another dtype is edited in its own."""
    if hparams.dtype is None and not hparams.fp16:
        return
    actual = next(model.parameters()).dtype
    if str(actual).replace("torch.", "") != hparams.model_dtype:
        logger.warning("the hparams ask for a %s model (dtype/fp16), but the model given is %s: it is edited in %s "
                       "(the dtype only applies where the plugin loads the model)", hparams.model_dtype,
                       str(actual).replace("torch.", ""), str(actual).replace("torch.", ""))


def _create_state(model, tok, hparams, method: EditMethod, templates: ModuleTemplates) -> EditingState:
    limit = max_positions(model)
    if limit is not None and hparams.context_template_length + 8 > limit:
        raise ValueError(f"context_template_length {hparams.context_template_length} leaves no room for a prompt in "
                         f"the model's {limit} positions; lower it")
    modules = edited_modules(model, hparams, templates)
    from_file = projector_file(hparams)
    if from_file is not None:
        null_spaces = load_projector_file(from_file, hparams.layers,
                                          {layer: weight_as_out_in(m).shape[1] for layer, m in modules.items()})
    else:
        if hparams.P_loc is not None:
            logger.info("P_loc %s does not exist: P is computed from the statistics and cached (not written there)",
                        hparams.P_loc)
        null_spaces = load_or_compute_null_spaces(model, tok, hparams, templates)
    second_moments = load_second_moments(model, tok, hparams, templates) if method.needs_second_moments else {}
    context_templates = generate_context_templates(model, tok, hparams.context_template_count,
                                                   hparams.context_template_length, hparams.seed)
    weights = {layer: weight_as_out_in(module).detach() for layer, module in modules.items()}
    reference_tensors, running_sums = method.initial_tensors(weights)
    return EditingState(identity=state_identity(model, hparams, templates, method), null_spaces=null_spaces,
                        context_templates=context_templates, second_moments=second_moments,
                        reference_tensors=reference_tensors, running_sums=running_sums).to(state_device(model, hparams))


# ---------------------------------------------------------------------------
# The solve: the one place P enters
# ---------------------------------------------------------------------------
def solve_layer(method: EditMethod, state: EditingState, layer: int, keys: torch.Tensor,
                residuals: torch.Tensor) -> torch.Tensor:
    """The method's solve at ``layer``, with P, Kp Kpᵀ and C0 from the state where its terms have them.

    keys: (d_in, n); residuals: (d_out, n).
    """
    terms = method.solve_terms()
    if terms.mom2_prior_weight is not None and layer not in state.second_moments:
        raise ValueError(f"{method.label} needs C0 of layer {layer} in the editing state, which has none; "
                         "create the state with the method's own hparams")
    return solve_with_terms(
        keys, residuals, terms,
        projector=state.projector_for(layer, keys.shape[0]) if terms.projection else None,
        earlier_keys_kkt_sum=state.earlier_keys_kkt_sum[layer] if terms.earlier_keys else None,
        second_moment=state.second_moments.get(layer) if terms.mom2_prior_weight is not None else None)


# ---------------------------------------------------------------------------
# Compute, then apply
# ---------------------------------------------------------------------------
def compute_update(model, tok, requests: Sequence[EditRequest], hparams, state: EditingState,
                   method: Optional[EditMethod] = None, templates: Optional[ModuleTemplates] = None) -> LayerUpdates:
    """Per-layer updates for ``requests``; the model's weights are left exactly as found."""
    method = method or registry.method_for(hparams)
    templates = templates or validate_setup(model, hparams)
    steps = method.steps()
    modules = edited_modules(model, hparams, templates)
    originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}
    value_layer = hparams.layers[-1]
    deltas: Dict[int, torch.Tensor] = {}
    layer_keys: Dict[int, torch.Tensor] = {}
    try:
        targets = steps.compute_targets(model, tok, requests, templates, value_layer, state.context_templates)
        for position, layer in enumerate(hparams.layers):
            keys, current = steps.compute_keys(model, tok, requests, templates, layer, value_layer,
                                               state.context_templates)
            residual = spread_residual(targets.values, current, position, len(hparams.layers))
            weight = weight_as_out_in(modules[layer]).detach()
            delta = solve_layer(method, state, layer, keys.T, residual.T)
            delta = method.finalize(layer, delta, weight, state)
            check_delta(method.label, layer, delta, weight)
            add_to_weight(modules[layer], delta)
            deltas[layer] = delta
            layer_keys[layer] = keys
    except DeltaError:
        raise
    except Exception as error:
        raise EditError(f"{method.label} failed, weights unchanged: {type(error).__name__}: {error}") from error
    finally:
        _restore(modules, originals)
    return LayerUpdates(deltas=deltas, keys=layer_keys, targets=targets)


def apply_update(model, requests: Sequence[EditRequest], hparams, state: EditingState, update: LayerUpdates,
                 method: Optional[EditMethod] = None, templates: Optional[ModuleTemplates] = None,
                 started: Optional[float] = None, tok=None) -> EditRecord:
    """Write ``update`` (through the method's ``combine``), measure what it achieves (with ``tok``), then commit
    it to ``state``; returns its record."""
    started = time.perf_counter() if started is None else started
    method = method or registry.method_for(hparams)
    templates = templates or validate_setup(model, hparams)
    modules = edited_modules(model, hparams, templates)
    before = {layer: weight_as_out_in(module).detach().clone() for layer, module in modules.items()}
    try:
        changes, running_sums = method.combine(update.deltas, before, state)
    except DeltaError:
        raise
    except Exception as error:
        raise EditError(f"{method.label} failed, weights unchanged: {type(error).__name__}: {error}") from error
    check_deltas(method.label, changes, before)

    originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}
    record, written = None, False
    # One try from the first write to the commit: an interrupt anywhere in between (also between the writes and
    # the record) puts the weights back, so that weights and state are both as before or both as after.
    try:
        for layer in hparams.layers:
            add_to_weight(modules[layer], changes[layer])
            if not torch.isfinite(modules[layer].weight).all():
                raise FloatingPointError(f"layer {layer}: the edited weight holds NaN or inf")
        written = True
        record = _record(requests, changes, before, update, state, time.perf_counter() - started)
        if tok is not None:
            _measure_outcome(model, tok, requests, update, state, method, record)
        state.commit(update.keys, record, running_sums)
    except BaseException as error:  # KeyboardInterrupt too
        if record is not None and state.edit_log and state.edit_log[-1] is record:
            raise  # interrupted right after the commit: the edit is whole, in the weights and in the state
        _restore(modules, originals)  # the state is unchanged: put the weights back as well
        if isinstance(error, Exception) and not written:
            raise EditError(f"{method.label} failed while writing, weights unchanged: {error}") from error
        if isinstance(error, Exception):
            raise EditError(f"{method.label} failed while recording the edit, weights unchanged: "
                            f"{type(error).__name__}: {error}") from error
        raise
    logger.info("%s: %d request(s) in %.1f s; update norms %s; preservation ‖ΔK0‖/‖WK0‖ %s", method.label,
                len(requests), record.seconds, {l: round(v, 3) for l, v in record.update_norms.items()},
                {l: f"{v:.2e}" for l, v in record.preservation.items()})
    if record.not_taken:
        shown = "; ".join(f"request {n['request']} ({n['prompt']!r} -> {n['target']!r}): p = {n['achieved']:.3f} "
                          f"after writing, {n['searched']:.3f} in the search; {n['why']}" for n in record.not_taken[:5])
        more = f" (and {len(record.not_taken) - 5} more)" if len(record.not_taken) > 5 else ""
        logger.warning("%s: %d of %d edit(s) did not take: %s%s", method.label, len(record.not_taken),
                       len(requests), shown, more)
    return record


def _measure_outcome(model, tok, requests: Sequence[EditRequest], update: LayerUpdates, state: EditingState,
                     method: EditMethod, record: EditRecord) -> None:
    """The new target's probability on each request's prompt as written (edit_outcome.py), and why one that
    did not take did not."""
    record.achieved_probability = achieved_probabilities(model, tok, requests)
    terms = method.solve_terms()
    projectors = {layer: state.null_spaces[layer].projector for layer in update.keys} if terms.projection else {}
    ranks = {layer: state.null_spaces[layer].rank for layer in update.keys} if terms.projection else {}
    for index, (request, achieved) in enumerate(zip(requests, record.achieved_probability)):
        searched = float(update.targets.target_probability[index])
        if took(achieved, searched):
            continue
        why = why_not_taken(searched, state.edits_applied + len(requests), ranks,
                            terms.ridge if terms.projection else None,
                            key_energies(update.keys, projectors, index) if terms.projection else {})
        record.not_taken.append({"request": index, "prompt": request.prompt, "target": request.target,
                                 "achieved": achieved, "searched": searched, "why": why})


def _record(requests: Sequence[EditRequest], changes: Mapping[int, torch.Tensor], before: Mapping[int, torch.Tensor],
            update: LayerUpdates, state: EditingState, seconds: float) -> EditRecord:
    preservation = {}
    for layer, change in changes.items():
        heldout = state.null_spaces[layer].heldout_keys
        if heldout is not None:
            preservation[layer] = preservation_ratio(change, before[layer], heldout.to(before[layer].device))
    return EditRecord(requests=[r.as_dict() for r in requests],
                      update_norms={layer: float(d.norm()) for layer, d in changes.items()},
                      preservation=preservation, target_probability=update.targets.target_probability,
                      seconds=seconds)


def _restore(modules: Mapping[int, torch.nn.Module], originals: Mapping[int, torch.Tensor]) -> None:
    """Put every layer's weight back; an interrupt arriving meanwhile is held until all of them are back."""
    held: Optional[BaseException] = None
    pending: Optional[List[int]] = None
    while pending is None or pending:
        try:  # every step is inside the try, the loop's own test included: an interrupt anywhere retries
            if pending is None:
                pending = list(modules)
            while pending:
                layer = pending[0]
                with torch.no_grad():
                    modules[layer].weight.copy_(originals[layer])
                pending.pop(0)
        except BaseException as error:  # KeyboardInterrupt mid-copy: copy that layer again
            held = held or error
    if held is not None:
        raise held


def edit_in_place(model, tok, requests: Sequence[EditRequest], hparams, state: EditingState,
                  method: Optional[EditMethod] = None, templates: Optional[ModuleTemplates] = None) -> LayerUpdates:
    """Compute and write one batch of edits, then record it in ``state``; returns the update.

    Atomic: if anything fails, every weight is exactly as before and the state is unchanged.
    ``requests`` are normalised and ``state`` checked for this model (see :func:`apply_to_model`).
    """
    started = time.perf_counter()
    method = method or registry.method_for(hparams)
    templates = templates or validate_setup(model, hparams)
    check_positions(model, tok, requests, state.context_templates)
    with edit_lock(model), editing_modes(model):
        update = compute_update(model, tok, requests, hparams, state, method, templates)
        apply_update(model, requests, hparams, state, update, method, templates, started, tok=tok)
    return update


def check_positions(model, tok, requests: Sequence[EditRequest], context_templates, extra_tokens: int = 0) -> None:
    """Refuse, naming the request and the limit, an edit whose longest row (context prefix + prompt + target,
    plus ``extra_tokens``) does not fit the model's positions: GPT-2 would fail deep inside the search with an
    IndexError."""
    limit = max_positions(model)
    if limit is None:
        return
    contexts = [context for group in context_templates for context in group]
    for index, request in enumerate(requests):
        target = len(encode(tok, request.target, special_tokens=False))
        longest = max(len(encode(tok, context.format(request.prompt))) for context in contexts) + target + extra_tokens
        if longest > limit:
            raise RequestError(f"request {index}: its prompt {request.prompt!r} with the target and the longest "
                               f"context prefix takes {longest} tokens; the model has {limit} positions. Shorten "
                               "the prompt or the target, or lower context_template_length")


def check_positions_before_statistics(model, tok, requests: Sequence[EditRequest], hparams) -> None:
    """:func:`check_positions` before a state exists: a context prefix of the configured length is assumed (a
    bound; the exact prefixes are checked again once they exist)."""
    bound = hparams.context_template_length + 4 if hparams.context_template_count else 0
    check_positions(model, tok, requests, [["{}"]], extra_tokens=bound)


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextmanager
def edit_lock(model) -> Iterator[None]:
    """One edit of ``model`` at a time: a second thread editing the same model waits for the first to finish
    (the lock is the model's; it goes with the model object)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(model, threading.RLock())
    with lock:
        yield


@contextmanager
def editing_modes(model) -> Iterator[None]:
    """What an edit needs, whatever the caller set: gradients on (the target search differentiates, also
    inside ``torch.no_grad()`` or ``torch.inference_mode()``) and every module in eval mode (no dropout in the
    keys and targets). The caller's modes come back afterwards."""
    training = [(module, module.training) for module in model.modules()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            model.eval()
            yield
    finally:
        for module, flag in training:
            module.training = flag


def edited_weights_copy(model, templates: ModuleTemplates, layers: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Copies of the weights an edit changes, by parameter name (EasyEdit's ``weights_copy``)."""
    return {f"{templates.rewrite_module_tmp.format(layer)}.weight":
            get_module(model, templates.rewrite_module_tmp.format(layer)).weight.detach().clone() for layer in layers}


def apply_to_model(
    model,
    tok,
    requests: Sequence[Mapping],
    hparams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    state: Optional[EditingState] = None,
    method: Optional[EditMethod] = None,
    **kwargs: Any,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Edit ``model`` with the method ``hparams`` belong to, so that each request's prompt continues with its
    new target. EasyEdit's ``apply_*_to_model`` contract: returns ``(model, weights_copy)``, where
    ``weights_copy`` maps parameter names to their original values when ``return_orig_weights`` is set.

    ``state`` carries projectors and earlier edits' keys across sequential calls; without one a fresh
    state is made (from the on-disk cache) and the edit is treated as the first. ``method`` replaces the
    registered method object (a subclass, for experiments). ``keep_original_weight`` and other EasyEdit
    keywords are accepted; the host restores weights itself when it asks for that.

    Atomic: if anything fails, every weight is exactly as before and the state is unchanged.
    """
    method = method or registry.method_for(hparams)
    hparams.validate()
    normalised = normalise_requests(requests)
    templates = validate_setup(model, hparams)
    if copy:
        model = copy_module.deepcopy(model)
    if state is None:
        check_positions_before_statistics(model, tok, normalised, hparams)
        state = create_state(model, tok, hparams)
    else:
        state.check_compatible(state_identity(model, hparams, templates, method))
    weights_copy = edited_weights_copy(model, templates, hparams.layers) if return_orig_weights else {}
    edit_in_place(model, tok, normalised, hparams, state, method, templates)
    return model, weights_copy


def check_delta(label: str, layer: int, delta: Any, weight: torch.Tensor) -> None:
    """Refuse a missing, misshapen or non-finite update, naming the method and the layer."""
    if delta is None:
        raise DeltaError(f"{label} produced no update for layer {layer}; weights unchanged")
    if not isinstance(delta, torch.Tensor):
        raise DeltaError(f"{label} produced a {type(delta).__name__} for layer {layer}, expected a tensor; "
                         "weights unchanged")
    if tuple(delta.shape) != tuple(weight.shape):
        raise DeltaError(f"{label} produced an update of shape {tuple(delta.shape)} for layer {layer}, whose "
                         f"weight is {tuple(weight.shape)} (out, in); weights unchanged")
    if not torch.isfinite(delta).all():
        raise DeltaError(f"{label} produced NaN or inf in the update of layer {layer}; weights unchanged")


def check_deltas(label: str, deltas: Mapping[int, Any], weights: Mapping[int, torch.Tensor]) -> None:
    if not isinstance(deltas, Mapping) or not deltas:
        raise DeltaError(f"{label} produced no update at all; weights unchanged")
    extra = sorted(set(deltas) - set(weights))
    if extra:
        raise DeltaError(f"{label} produced updates for layers {extra}, which are not edited "
                         f"({sorted(weights)}); weights unchanged")
    for layer, weight in weights.items():
        check_delta(label, layer, deltas.get(layer), weight)
