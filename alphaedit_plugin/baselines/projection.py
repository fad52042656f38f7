"""AlphaEdit's null-space projection added to other editors (AlphaEdit paper, Section 4.5).

Two ways, for two kinds of editor:

1. :class:`NullSpaceProjection`, a mixin for executors that solve normal
   equations (MEMIT and what is built on it: PRUNE, RECT). Where the
   executor solves ``Δ = R K1ᵀ (B + K1 K1ᵀ)⁻¹`` with its own preservation
   term B (MEMIT: λ C0), the mixin solves instead

       Δ = R K1ᵀ P ((Kp Kpᵀ + K1 K1ᵀ) P + L2·I)⁻¹

   with the projector P of the layer and the running Kp Kpᵀ of earlier
   edits, then adds this call's K1 K1ᵀ to Kp Kpᵀ. This is the one-line change
   of the paper: P takes over what B did (keeping W K0 in place), so B leaves
   the objective as in AlphaEdit's Eqs. 10–11, and for MEMIT the result is
   AlphaEdit's update (tested). ``projection_keeps_mom2_term: true`` keeps B
   too, ``((B + Kp Kpᵀ + K1 K1ᵀ) P + L2·I)⁻¹``, which constrains twice.
   Because ``(P A + λI)⁻¹ P = P (A P + λI)⁻¹``, the rows of Δ lie in the
   range of P either way, so ΔW·K0 ≈ 0. Everything else of the
   executor (keys, targets, the layer loop, PRUNE's restraint, RECT's
   sparsification) is its own. ``with_projection(MEMITExecutor)`` gives the
   projected class; ``projection: true`` in the hparams selects it.

2. :func:`apply_with_delta_projection`, a fallback for editors whose solve
   cannot take P (ROME's rank-one closed form, fine-tuning's gradient steps):
   run the editor, take the change Δ it made to each edited layer, and write
   Δ P instead. This also gives ΔW·K0 ≈ 0, but it is weaker than the
   constrained solve: the editor chose Δ without knowing the constraint, so
   Δ P generally no longer does what Δ did on the new facts' keys
   (Δ P K1 ≠ Δ K1: the part of the edit that lay in the preserved directions
   is lost rather than re-solved within the null space), and there is no
   Kp Kpᵀ term, so earlier edits are protected only as far as P protects
   them. Use it to check the paper's claim on such editors, not as their
   AlphaEdit version.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from ..alphaedit_main import EditError
from ..architectures import add_to_weight, get_module, is_transposed, weight_as_out_in
from ..solve import constrained_update
from ..state import AlphaEditState
from .memit import DeltaError, ExecutorUpdate, MEMITExecutor

logger = logging.getLogger(__name__)


class ProjectorMismatchError(ValueError):
    """A projector does not belong to the layer (or model) it is used for."""


def projected_update(keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor,
                     previous_keys_cov: Optional[torch.Tensor], preservation: Optional[torch.Tensor],
                     l2: float) -> torch.Tensor:
    """Δ = R K1ᵀ P ((B + Kp Kpᵀ + K1 K1ᵀ) P + l2·I)⁻¹ with B = ``preservation`` (None: 0).

    The core's constrained solve, whose "earlier keys" matrix receives B + Kp Kpᵀ.
    """
    extra = None
    for term in (previous_keys_cov, preservation):
        if term is not None:
            term = term.to(torch.float64)
            extra = term if extra is None else extra + term.to(extra.device)
    return constrained_update(keys=keys, residuals=residuals, projector=projector, previous_keys_cov=extra, l2=l2)


def project_delta(delta: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """Δ P: the rows of an (out, in) update projected onto the null space."""
    if projector.ndim != 2 or projector.shape[0] != projector.shape[1] or projector.shape[0] != delta.shape[-1]:
        raise ProjectorMismatchError(f"projector of shape {tuple(projector.shape)} does not fit an update with "
                                     f"{delta.shape[-1]} inputs")
    return (delta.to(torch.float64) @ projector.to(device=delta.device, dtype=torch.float64)).to(delta.dtype)


def _projector_for(state: AlphaEditState, layer: int, d_in: int) -> torch.Tensor:
    space = state.null_spaces.get(layer)
    if space is None:
        raise ProjectorMismatchError(f"the editing state has no projector for layer {layer} "
                                     f"(it has layers {sorted(state.null_spaces)})")
    if tuple(space.projector.shape) != (d_in, d_in):
        raise ProjectorMismatchError(f"the projector of layer {layer} is {tuple(space.projector.shape)} but the "
                                     f"edited weight has {d_in} inputs: it was made for another model or module")
    return space.projector


class NullSpaceProjection:
    """Mixin: put P into the host executor's solve and carry Kp Kpᵀ. Must come before the executor class."""

    projected = True

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        core = self.state.core
        projector = _projector_for(core, layer, keys.shape[0])
        keep = getattr(self.hparams, "projection_keeps_mom2_term", False)
        return projected_update(keys, residuals, projector=projector, previous_keys_cov=core.previous_keys_cov[layer],
                                preservation=self.preservation_term(layer) if keep else None, l2=self.hparams.L2)

    def finalize(self, layer: int, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        delta = super().finalize(layer, delta, weight)
        order = getattr(self.hparams, "rect_projection_order", "sparsify_then_project")
        if self.finalize_leaves_null_space and order == "sparsify_then_project":
            delta = project_delta(delta, _projector_for(self.state.core, layer, delta.shape[1]))
        return delta

    def commit(self, update: ExecutorUpdate) -> None:
        super().commit(update)
        core = self.state.core
        for layer, keys in update.keys.items():
            keys = keys.to(core.previous_keys_cov[layer])
            core.previous_keys_cov[layer] += keys.T @ keys


_PROJECTED: Dict[type, type] = {}


def with_projection(executor: type) -> type:
    """The projected twin of an executor class (made once per class, then reused)."""
    if not (isinstance(executor, type) and issubclass(executor, MEMITExecutor)):
        raise TypeError(f"with_projection needs a MEMITExecutor subclass (an executor that solves normal equations); "
                        f"for other editors use apply_with_delta_projection. Got {executor!r}")
    if issubclass(executor, NullSpaceProjection):
        return executor
    if executor not in _PROJECTED:
        _PROJECTED[executor] = type(f"Projected{executor.__name__}", (NullSpaceProjection, executor),
                                    {"__doc__": f"{executor.__name__} with the null-space projection P in its solve."})
    return _PROJECTED[executor]


# ---------------------------------------------------------------------------
# The fallback: project the change another editor made
# ---------------------------------------------------------------------------
def apply_with_delta_projection(
    apply_fn: Callable[..., Tuple[Any, Dict[str, torch.Tensor]]],
    model,
    tok,
    requests: Sequence[Mapping],
    hparams: Any,
    state: AlphaEditState,
    layers: Iterable[int],
    rewrite_module_tmp: str,
    **kwargs: Any,
) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Run an EasyEdit-style ``apply_fn`` and keep only the null-space part of what it wrote.

    ``apply_fn(model, tok, requests, hparams, copy=False, return_orig_weights=True,
    keep_original_weight=True, **kwargs) -> (model, weights_copy)`` (ROME, FT,
    ...). Only the weights of ``rewrite_module_tmp.format(layer)`` for
    ``layers`` may change, and each must have a projector of matching size in
    ``state``. Returns ``(model, weights_copy)`` with the original weights of
    the projected layers. On any error every weight the editor changed is put
    back and the error says why.
    """
    layers = list(layers)
    names = {layer: f"{rewrite_module_tmp.format(layer)}.weight" for layer in layers}
    modules = {layer: get_module(model, rewrite_module_tmp.format(layer)) for layer in layers}
    projectors = {layer: _projector_for(state, layer, weight_as_out_in(m).shape[1]) for layer, m in modules.items()}
    originals = {layer: m.weight.detach().clone() for layer, m in modules.items()}
    label = getattr(apply_fn, "__name__", type(apply_fn).__name__)
    weights_copy: Dict[str, torch.Tensor] = {}

    def restore() -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights_copy.items():
                if name in params and params[name].shape == value.shape:
                    params[name].copy_(value)
            for layer, module in modules.items():
                if module.weight.shape == originals[layer].shape:
                    module.weight.copy_(originals[layer])
                else:  # the editor replaced the parameter itself
                    module.weight = torch.nn.Parameter(originals[layer], requires_grad=module.weight.requires_grad)

    try:
        result = apply_fn(model, tok, requests, hparams, copy=False, return_orig_weights=True,
                          keep_original_weight=True, **kwargs)
        if not (isinstance(result, tuple) and len(result) >= 2):
            raise DeltaError(f"{label} returned {type(result).__name__}, expected (model, weights_copy)")
        edited, weights_copy = result[0], dict(result[1] or {})
        if edited is not model:
            raise DeltaError(f"{label} returned another model object; call it with copy=False")
        outside = sorted(set(weights_copy) - set(names.values()))
        if outside:
            raise DeltaError(f"{label} changed parameters outside the projected layers: {outside}; only "
                             f"{sorted(names.values())} can be projected")
        deltas = {}
        for layer, module in modules.items():
            if module.weight.shape != originals[layer].shape:
                raise DeltaError(f"{label} left layer {layer}'s weight with shape {tuple(module.weight.shape)}, "
                                 f"not {tuple(originals[layer].shape)}")
            change = module.weight.detach() - originals[layer]
            if not torch.isfinite(change).all():
                raise DeltaError(f"{label} wrote NaN or inf into layer {layer}")
            deltas[layer] = change.T if is_transposed(module) else change
        if all(float(d.abs().max()) == 0.0 for d in deltas.values()):
            raise DeltaError(f"{label} produced no update in layers {layers}")
    except Exception as error:
        restore()
        if isinstance(error, EditError):
            raise DeltaError(f"{error}; weights unchanged") from error
        raise EditError(f"{label} failed, weights unchanged: {type(error).__name__}: {error}") from error

    with torch.no_grad():
        for layer, module in modules.items():
            module.weight.copy_(originals[layer])
            add_to_weight(module, project_delta(deltas[layer], projectors[layer]))
    logger.info("%s: update projected onto the null space in layers %s", label, layers)
    return model, {names[layer]: originals[layer] for layer in layers}
