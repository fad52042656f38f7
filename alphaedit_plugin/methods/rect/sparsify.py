"""RECT's sparsification (Gu et al., "Model editing harms general abilities of large language models:
regularization to the rescue", EMNLP 2024). Pure functions.

RECT measures how much an update changes each weight relative to its size,
|Δ_ij| / |W_ij|, keeps the top ``rect_top_fraction`` (40% in the paper) of
the entries by that measure as the edit's principal information, and sets
the rest to zero, which bounds how far each edit moves the weights. It is
applied to each layer's update as it is solved, before the next layer's
keys are read, so the later layers see the update that is really written.

With the projection P the sparsified update generally leaves the null space
(zeroing entries mixes the directions of a row), so the order is a choice,
``rect_projection_order``:

- ``sparsify_then_project`` (default): Δ' = (Δ ⊙ M) P. ΔW·K0 ≈ 0 holds as for
  every projected variant, and ‖Δ'‖ ≤ ‖Δ ⊙ M‖ (P is an orthogonal
  projector), but Δ' is not sparse any more.
- ``project_then_sparsify``: Δ' = Δ ⊙ M with Δ from the projected solve:
  exactly RECT's sparsity, while ΔW·K0 ≈ 0 only holds approximately.
"""

from __future__ import annotations

import math

import torch


def relative_change_mask(delta: torch.Tensor, weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ceil(fraction · numel) entries with the largest |Δ|/|W| (zero Δ ranks last)."""
    if delta.shape != weight.shape:
        raise ValueError(f"update {tuple(delta.shape)} and weight {tuple(weight.shape)} differ in shape")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    magnitude = delta.abs().to(torch.float64)
    relative = magnitude / weight.abs().to(device=delta.device, dtype=torch.float64)  # W_ij = 0 gives inf: kept first
    relative = torch.where(magnitude == 0, torch.zeros_like(relative), relative)
    keep = min(delta.numel(), math.ceil(fraction * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(relative.flatten(), keep).indices] = True
    return mask.view_as(delta) & (magnitude > 0)


def sparsify_by_relative_change(delta: torch.Tensor, weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """RECT: Δ with every entry outside the top ``fraction`` by |Δ|/|W| set to zero."""
    return torch.where(relative_change_mask(delta, weight, fraction), delta, torch.zeros_like(delta))
