"""SPHERE's soft projection of an update away from the weight's principal input directions.

SPHERE (in the current EasyEdit, ``easyeditor/models/SPHERE``) writes
AlphaEdit's update Δ as Δ (I − α U Uᵀ): U spans the directions along which
the weight's rows, each scaled to unit length, concentrate (the top
eigenvectors of Ŵᵀ Ŵ / rows, as many as cover the share η of its trace),
and α ∈ [0, 1] says how much of the update along them is taken away. The
idea: edits that pile up along the weight's dominant directions are what
distorts the model over thousands of edits; damping them leaves more room.

The functions take the weight as (out, in), so U lives in the input space,
where AlphaEdit's keys and P live, for ``Linear`` and ``Conv1D`` alike (the
host applies it to the stored matrix, which for GPT-2's ``Conv1D`` is the
output side). Unlike P, the soft projection is not exact on K0: Δ U Uᵀ has
a part outside the null space, so ΔK0 ≈ 0 holds up to α ‖Δ U Uᵀ K0‖.
"""

from __future__ import annotations

import torch


def principal_input_directions(weight: torch.Tensor, cumulative_ratio: float) -> torch.Tensor:
    """(d_in, r) orthonormal top eigenvectors of Ŵᵀ Ŵ / rows, Ŵ the (out, in) ``weight`` with unit rows.

    r is SPHERE's: one more than the number of leading eigenvalues whose running sum stays within
    ``cumulative_ratio`` of the trace (so at least one direction).
    """
    rows = weight.detach().to(torch.float32)
    unit = rows / (rows.norm(dim=1, keepdim=True) + 1e-8)
    gram = unit.T @ unit / unit.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    leading = torch.cumsum(eigenvalues.flip(0), 0) / eigenvalues.sum()
    r = min(int((leading <= cumulative_ratio).sum()) + 1, eigenvalues.numel())
    return eigenvectors[:, -r:]


def soft_project(delta: torch.Tensor, directions: torch.Tensor, strength: float) -> torch.Tensor:
    """Δ (I − α U Uᵀ) for a (out, in) update, without forming the d_in × d_in matrix."""
    directions = directions.to(device=delta.device, dtype=delta.dtype)
    return delta - strength * (delta @ directions) @ directions.T
