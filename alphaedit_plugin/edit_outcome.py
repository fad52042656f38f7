"""What a written edit achieves, and why one did not take.

The target search logs the probability it reached with δ added to the hidden
state; what the written weights achieve can be far less (a null space too
small for the edits so far, a ridge that shrinks the update, a search that
never converged). After writing, :func:`achieved_probabilities` measures, in
one batched forward pass, each request's new target on its bare prompt: the
geometric mean of the per-token probabilities, as the evaluation scores an
answer (the search maximises the same quantity, averaged over the context
prefixes too). A request whose
achieved probability is below ``TOOK_FRACTION`` of the searched one (of 1
where the search reports none) did not take; :func:`why_not_taken` says what
it can tell.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .evaluation.scoring import answer_nll
from .null_space_projector import ProjectorTensor, project_columns
from .requests import EditRequest

TOOK_FRACTION = 0.5
SEARCH_CONVERGED = 0.5  # the search's own probability below this: it did not reach the target


def achieved_probabilities(model, tok, requests: Sequence[EditRequest]) -> List[float]:
    """Per request, exp(mean log P(target token | prompt, earlier target tokens)) under the model as it is: the
    evaluation's own answer score (:func:`~alphaedit_plugin.evaluation.scoring.answer_nll`)."""
    nll = answer_nll(model, tok, [(request.prompt, request.target) for request in requests])
    return [math.exp(-value) for value in nll]


def took(achieved: float, searched: float) -> bool:
    reference = searched if isinstance(searched, float) and math.isfinite(searched) else 1.0
    return achieved >= TOOK_FRACTION * reference


def why_not_taken(searched: float, edits_so_far: int, ranks: Mapping[int, int], ridge: Optional[float],
                  key_energy: Mapping[int, float]) -> str:
    """The likeliest reasons, as far as the numbers tell: ``ranks`` the null-space rank per layer (projected
    methods), ``ridge`` their L2, ``key_energy`` the request's ‖P k‖² per layer."""
    reasons = []
    if isinstance(searched, float) and math.isfinite(searched) and searched < SEARCH_CONVERGED:
        reasons.append(f"the target search reached only p = {searched:.3f} (raise v_num_grad_steps or v_lr)")
    if ranks:
        layer = min(ranks, key=ranks.get)
        if edits_so_far >= ranks[layer]:
            reasons.append(f"the null space (rank {ranks[layer]} at layer {layer}) has fewer directions than the "
                           f"{edits_so_far} edits made so far")
    if ridge is not None and key_energy:
        layer = min(key_energy, key=key_energy.get)
        if ridge > key_energy[layer]:
            reasons.append(f"L2 = {ridge:g} exceeds the edit's ‖P k‖² = {key_energy[layer]:.3g} at layer {layer}: "
                           "the ridge shrinks the update (lower L2)")
    return "; ".join(reasons) or "not known (the written update falls short of the searched target)"


def key_energies(keys: Mapping[int, torch.Tensor], projectors: Mapping[int, Optional[ProjectorTensor]],
                 index: int) -> Dict[int, float]:
    """‖P k‖² per layer of request ``index``'s key (P = I where a layer has no projector)."""
    result = {}
    for layer, layer_keys in keys.items():
        key = layer_keys[index].double()
        projector = projectors.get(layer)
        projected = project_columns(projector, key) if projector is not None else key
        result[layer] = float(projected.dot(projected))
    return result
