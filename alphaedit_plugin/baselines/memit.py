"""MEMIT as an executor: the update Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹ (Meng et al., ICLR 2023, Eq. 14).

The executor computes, per edited layer, the keys K1 and the residual R of
the new facts (with AlphaEdit's MEMIT-equivalent key and target steps) and
solves for Δ in :meth:`MEMITExecutor.solve`. That method is the one place
the projection mixin (:mod:`.projection`) changes. PRUNE and RECT
(:mod:`.prune`, :mod:`.rect`) are subclasses that change what happens to
the solved update, as their papers describe.

Where the steps come from: by default the plugin's own (batched target
search, context-averaged keys); with ``memit_steps: easyeditor`` the EasyEdit
host's ``compute_z`` and ``compute_ks`` themselves (:mod:`.host_steps`, which
overrides :meth:`MEMITExecutor.compute_targets` and
:meth:`MEMITExecutor.compute_keys`). The solve is always this module's: the
host writes it inline in ``execute_memit``, where P cannot be inserted. It is
the core's float64 solve with the preservation term passed as the "earlier
keys" matrix (see :func:`memit_update`); tests check it against the closed
form computed independently and, with the host's steps, against the host's
own ``execute_memit``. Everything the host's MEMIT does (context-prefix
averaged keys at the subject's last token, one target search at the last
edited layer, the residual spread evenly over the remaining layers, each
layer's update in place before the next layer's keys are read) is done the
same way here.
"""

from __future__ import annotations

import copy as copy_module
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..alphaedit_main import EditError, validate_setup
from ..architectures import add_to_weight, get_module, weight_as_out_in
from ..compute_keys import compute_keys_and_values
from ..compute_targets import TargetSearchResult, compute_target_values
from ..requests import EditRequest, normalise_requests
from ..solve import constrained_update, preservation_ratio
from ..state import EditRecord
from .hparams import BaselineHyperParams
from .state import BaselineState, baseline_identity, create_baseline_state

logger = logging.getLogger(__name__)


class DeltaError(EditError):
    """An executor produced no update, or one that does not fit the weight; nothing was written."""


def memit_update(keys: torch.Tensor, residuals: torch.Tensor, preservation: torch.Tensor) -> torch.Tensor:
    """MEMIT's Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹, with ``preservation`` = λ C0 (d_in × d_in).

    keys: (d_in, n); residuals: (d_out, n). The core's solve with no
    projector and no ridge solves exactly these normal equations in float64.
    """
    return constrained_update(keys=keys, residuals=residuals, projector=None, previous_keys_cov=preservation, l2=0.0)


@dataclass
class ExecutorUpdate:
    """What one call computed: per layer the update to write, the keys K1, and per-method extras."""

    deltas: Dict[int, torch.Tensor]  # (out, in), as they will be written
    keys: Dict[int, torch.Tensor]  # (n, d_in)
    targets: TargetSearchResult
    extras: Dict[str, Any] = field(default_factory=dict)


class MEMITExecutor:
    """MEMIT: each layer's update solves MEMIT's normal equations; nothing is done to it afterwards."""

    projected = False
    finalize_leaves_null_space = False  # True where finalize() can move an update out of the null space (RECT)

    def __init__(self, hparams: BaselineHyperParams, state: BaselineState):
        self.hparams = hparams
        self.state = state

    # ---- the steps a variant may change ------------------------------------
    def compute_targets(self, model, tok, requests: Sequence[EditRequest], templates, value_layer: int,
                        context_templates) -> TargetSearchResult:
        """The target hidden states V1 at block ``value_layer`` (MEMIT's ``compute_z``, batched)."""
        return compute_target_values(model, tok, requests, self.hparams, templates, value_layer, context_templates)

    def compute_keys(self, model, tok, requests: Sequence[EditRequest], templates, layer: int, value_layer: int,
                     context_templates) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(keys (n, d_in), current values (n, d_hidden))``: MEMIT's ``compute_ks`` and the block output at
        ``value_layer`` the residual is measured against, for the weights now in the model."""
        return compute_keys_and_values(model, tok, requests, templates, layer, value_layer, context_templates,
                                       self.hparams.fact_token)

    def preservation_term(self, layer: int) -> torch.Tensor:
        """λ C0: MEMIT's prior that keeps W K0 (the preserved keys' outputs) in place."""
        return self.hparams.mom2_update_weight * self.state.second_moments[layer]

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """The update of one layer from keys (d_in, n) and residuals (d_out, n)."""
        return memit_update(keys, residuals, self.preservation_term(layer))

    def finalize(self, layer: int, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What the method does to a solved update before it is written (RECT sparsifies it)."""
        return delta

    def combine(self, update: ExecutorUpdate, weights: Mapping[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
        """The per-layer changes to write, given the weights now in the model (PRUNE restrains the total)."""
        return dict(update.deltas)

    def commit(self, update: ExecutorUpdate) -> None:
        """Record in the state what the written update means for later edits (nothing for MEMIT)."""

    # ---- the layer loop ------------------------------------------------------
    def execute(self, model, tok, requests: Sequence[EditRequest]) -> ExecutorUpdate:
        """Per-layer updates for ``requests``; the model's weights are left exactly as found."""
        hparams = self.hparams
        templates = validate_setup(model, hparams)
        modules = {layer: get_module(model, templates.rewrite_module_tmp.format(layer)) for layer in hparams.layers}
        originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}
        value_layer = hparams.layers[-1]
        context_templates = self.state.core.context_templates
        deltas: Dict[int, torch.Tensor] = {}
        layer_keys: Dict[int, torch.Tensor] = {}
        try:
            targets = self.compute_targets(model, tok, requests, templates, value_layer, context_templates)
            for position, layer in enumerate(hparams.layers):
                keys, current = self.compute_keys(model, tok, requests, templates, layer, value_layer,
                                                  context_templates)
                residual = (targets.values - current) / (len(hparams.layers) - position)  # MEMIT Eq. 20
                weight = weight_as_out_in(modules[layer]).detach()
                delta = self.solve(layer, keys.T, residual.T)
                delta = self.finalize(layer, delta, weight)
                check_delta(type(self).__name__, layer, delta, weight)
                add_to_weight(modules[layer], delta)
                deltas[layer] = delta
                layer_keys[layer] = keys
        except DeltaError:
            raise
        except Exception as error:
            raise EditError(f"{hparams.label} failed, weights unchanged: {type(error).__name__}: {error}") from error
        finally:
            with torch.no_grad():
                for layer, module in modules.items():
                    module.weight.copy_(originals[layer])
        return ExecutorUpdate(deltas=deltas, keys=layer_keys, targets=targets)


def check_delta(executor: str, layer: int, delta: Any, weight: torch.Tensor) -> None:
    """Refuse a missing, misshapen or non-finite update, naming the executor and the layer."""
    if delta is None:
        raise DeltaError(f"{executor} produced no update for layer {layer}; weights unchanged")
    if not isinstance(delta, torch.Tensor):
        raise DeltaError(f"{executor} produced a {type(delta).__name__} for layer {layer}, expected a tensor; "
                         "weights unchanged")
    if tuple(delta.shape) != tuple(weight.shape):
        raise DeltaError(f"{executor} produced an update of shape {tuple(delta.shape)} for layer {layer}, whose "
                         f"weight is {tuple(weight.shape)} (out, in); weights unchanged")
    if not torch.isfinite(delta).all():
        raise DeltaError(f"{executor} produced NaN or inf in the update of layer {layer}; weights unchanged")


def check_deltas(executor: str, deltas: Mapping[int, Any], weights: Mapping[int, torch.Tensor]) -> None:
    if not isinstance(deltas, Mapping) or not deltas:
        raise DeltaError(f"{executor} produced no update at all; weights unchanged")
    extra = sorted(set(deltas) - set(weights))
    if extra:
        raise DeltaError(f"{executor} produced updates for layers {extra}, which are not edited "
                         f"({sorted(weights)}); weights unchanged")
    for layer, weight in weights.items():
        check_delta(executor, layer, deltas.get(layer), weight)


# ---------------------------------------------------------------------------
def executor_class(hparams: BaselineHyperParams) -> type:
    from .projection import with_projection
    from .prune import PRUNEExecutor
    from .rect import RECTExecutor

    base = {"MEMIT": MEMITExecutor, "PRUNE": PRUNEExecutor, "RECT": RECTExecutor}[hparams.alg_name]
    if getattr(hparams, "memit_steps", "plugin") == "easyeditor":
        base = with_host_steps(base)
    return with_projection(base) if hparams.projection else base


_WITH_HOST_STEPS: Dict[type, type] = {}


def with_host_steps(executor: type) -> type:
    """The executor class whose target search and keys are the EasyEdit host's own (see host_steps.py)."""
    from .host_steps import EasyEditMEMITSteps, host_memit_modules

    host_memit_modules()  # a clear error now if the host is missing, not in the middle of an edit
    if issubclass(executor, EasyEditMEMITSteps):
        return executor
    if executor not in _WITH_HOST_STEPS:
        _WITH_HOST_STEPS[executor] = type(f"EasyEdit{executor.__name__}", (EasyEditMEMITSteps, executor),
                                          {"__doc__": f"{executor.__name__} on the EasyEdit host's compute_z and "
                                                      "compute_ks."})
    return _WITH_HOST_STEPS[executor]


def apply_baseline_to_model(
    model,
    tok,
    requests: Sequence[Mapping],
    hparams: BaselineHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    state: Optional[BaselineState] = None,
    executor: Optional[type] = None,
    **kwargs: Any,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Edit ``model`` with MEMIT, PRUNE or RECT (``hparams.projection``: with P). EasyEdit's contract.

    Returns ``(model, weights_copy)``. ``state`` carries what sequential
    editing needs (see :class:`BaselineState`); without one a fresh state is
    made and the edit is the first. ``executor`` overrides the class chosen
    from the hparams (any subclass of :class:`MEMITExecutor`). Atomic: on
    any failure every weight and the state are as before.
    """
    if not isinstance(hparams, BaselineHyperParams):
        raise TypeError(f"apply_baseline_to_model needs MEMIT/PRUNE/RECT hparams from alphaedit_plugin.baselines, "
                        f"got {type(hparams).__module__}.{type(hparams).__name__}")
    started = time.perf_counter()
    hparams.validate()
    normalised = normalise_requests(requests)
    templates = validate_setup(model, hparams)
    if copy:
        model = copy_module.deepcopy(model)
    if state is None:
        state = create_baseline_state(model, tok, hparams)
    else:
        state.check_compatible(baseline_identity(model, hparams, templates))
    runner = (executor or executor_class(hparams))(hparams, state)
    modules = {layer: get_module(model, templates.rewrite_module_tmp.format(layer)) for layer in hparams.layers}
    weights_copy = {}
    if return_orig_weights:
        weights_copy = {f"{templates.rewrite_module_tmp.format(layer)}.weight": module.weight.detach().clone()
                        for layer, module in modules.items()}

    update = runner.execute(model, tok, normalised)
    before = {layer: weight_as_out_in(module).detach().clone() for layer, module in modules.items()}
    try:
        changes = runner.combine(update, before)
    except DeltaError:
        raise
    except Exception as error:
        raise EditError(f"{hparams.label} failed, weights unchanged: {type(error).__name__}: {error}") from error
    check_deltas(type(runner).__name__, changes, before)
    originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}
    try:
        for layer in hparams.layers:
            add_to_weight(modules[layer], changes[layer])
            if not torch.isfinite(modules[layer].weight).all():
                raise FloatingPointError(f"layer {layer}: the edited weight holds NaN or inf")
    except Exception as error:
        with torch.no_grad():
            for layer, module in modules.items():
                module.weight.copy_(originals[layer])
        raise EditError(f"{hparams.label} failed while writing, weights unchanged: {error}") from error

    runner.commit(update)
    core = state.core
    preservation = {}
    for layer in hparams.layers:
        heldout = core.null_spaces[layer].heldout_keys
        if heldout is not None:
            preservation[layer] = preservation_ratio(changes[layer], before[layer], heldout.to(before[layer].device))
    seconds = time.perf_counter() - started
    core.edit_log.append(EditRecord(
        requests=[r.as_dict() for r in normalised],
        update_norms={layer: float(d.norm()) for layer, d in changes.items()},
        preservation=preservation,
        target_probability=update.targets.target_probability,
        seconds=seconds,
    ))
    logger.info("%s: %d request(s) in %.1f s; update norms %s; preservation ‖ΔK0‖/‖WK0‖ %s", hparams.label,
                len(normalised), seconds, {l: round(v, 3) for l, v in core.edit_log[-1].update_norms.items()},
                {l: f"{v:.2e}" for l, v in preservation.items()})
    return model, weights_copy
