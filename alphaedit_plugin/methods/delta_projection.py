"""AlphaEdit's projection for editors whose solve cannot take P (AlphaEdit paper, Section 4.5).

For the MEMIT family (MEMIT, PRUNE, RECT) P goes into the solve itself:
``projection: true`` in their hparams gives the paper's one-line change
(:func:`~alphaedit_plugin.constrained_solve.with_projection`, applied by the
edit loop's one solve). This module is the fallback for the others, such as
ROME's rank-one closed form or fine-tuning's gradient steps:
:func:`apply_with_delta_projection` runs the editor, takes the change Δ it
made to each edited layer, and writes Δ P instead. This also gives
ΔW·K0 ≈ 0, but it is weaker than the constrained solve: the editor chose Δ
without knowing the constraint, so Δ P generally no longer does what Δ did
on the new facts' keys (Δ P K1 ≠ Δ K1: the part of the edit that lay in the
preserved directions is lost rather than re-solved within the null space),
and there is no Kp Kpᵀ term, so earlier edits are protected only as far as
P protects them. Use it to check the paper's claim on such editors, not as
their AlphaEdit version.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple

import torch

from ..architectures import add_to_weight, get_module, is_transposed, weight_as_out_in
from ..constrained_solve import project_rows
from ..errors import DeltaError, EditError
from ..state import EditingState

logger = logging.getLogger(__name__)


def apply_with_delta_projection(
    apply_fn: Callable[..., Tuple[Any, Dict[str, torch.Tensor]]],
    model,
    tok,
    requests: Sequence[Mapping],
    hparams: Any,
    state: EditingState,
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
    projectors = {layer: state.projector_for(layer, weight_as_out_in(m).shape[1]) for layer, m in modules.items()}
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
            add_to_weight(module, project_rows(deltas[layer], projectors[layer]))
    logger.info("%s: update projected onto the null space in layers %s", label, layers)
    return model, {names[layer]: originals[layer] for layer in layers}
