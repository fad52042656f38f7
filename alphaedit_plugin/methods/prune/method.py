"""PRUNE on MEMIT: each call's update is MEMIT's (±P), and the model is kept at W + F(Σ_j Δ_j).

PRUNE supplies to the edit loop what it keeps (the original weights and the
unrestrained sum of its updates, ``raw_totals``) and what it writes: the
change that takes the weights to W + F(total) (:mod:`.restraint`).
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch

from ..memit.method import MEMIT
from .restraint import largest_sv, restrain_singular_values

TensorsByLayer = Dict[int, torch.Tensor]


class PRUNE(MEMIT):
    """MEMIT's update, written so that the model holds W + F(Σ_j Δ_j)."""

    def initial_tensors(self, weights: Mapping[int, torch.Tensor]):
        original = {layer: weight.clone() for layer, weight in weights.items()}
        totals = {layer: torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
                  for layer, weight in weights.items()}
        return {"original_weights": original}, {"raw_totals": totals}

    def combine(self, deltas: Mapping[int, torch.Tensor], weights: Mapping[int, torch.Tensor],
                state) -> Tuple[TensorsByLayer, Dict[str, TensorsByLayer]]:
        changes, totals = {}, {}
        for layer, delta in deltas.items():
            device = weights[layer].device  # the layer's device; the state's tensors may live elsewhere
            original = state.reference_tensors["original_weights"][layer].to(device)
            previous = state.running_sums["raw_totals"][layer]
            total = previous.to(device) + delta.to(device=device, dtype=torch.float64)
            restrained = restrain_singular_values(total, largest_sv(original), self.hparams.prune_log_base)
            target = original.to(torch.float64) + restrained
            changes[layer] = (target - weights[layer].to(torch.float64)).to(weights[layer].dtype)
            totals[layer] = total.to(previous.device)
        return changes, {"raw_totals": totals}
