"""How much of AlphaEdit's kept null space the edits so far occupy (the capacity left for later edits).

Pure functions: tensors in, numbers out.

Every edit's keys join Kp Kpᵀ, which enters the solve as P Kp Kpᵀ P beside
the ridge (``L2``·I): Δ = R K1ᵀ P ((Kp Kpᵀ + K1 K1ᵀ) P + L2·I)⁻¹. A direction
of the null space where an eigenvalue of P Kp Kpᵀ P exceeds the ridge is one
the earlier edits hold: a new key along it is served only by damping what they
wrote. The count of such directions is the *occupied* part of the null space;
``null_space - occupied`` is what is *left*. AlphaEdit's capacity wall comes
when nothing is left (docs/lifelong.md).
"""

from __future__ import annotations

from typing import Dict

import torch

from .null_space_projector import ProjectorTensor, project_both_sides


def null_space_occupancy(projector: ProjectorTensor, earlier_keys_kkt_sum: torch.Tensor, null_space_rank: int,
                         tolerance: float) -> Dict[str, int]:
    """``{"null_space", "occupied", "left"}`` of one layer.

    ``projector``: P (dense or factored); ``earlier_keys_kkt_sum``: Kp Kpᵀ, (d, d); ``null_space_rank``: the
    dimension of P's range; ``tolerance``: the eigenvalue of P Kp Kpᵀ P above which a direction counts as
    occupied (the solve's ridge).
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    d = earlier_keys_kkt_sum.shape[0]
    if tuple(earlier_keys_kkt_sum.shape) != (d, d) or tuple(projector.shape) != (d, d):
        raise ValueError(f"Kp Kpᵀ {tuple(earlier_keys_kkt_sum.shape)} and P {tuple(projector.shape)} must be "
                         "square and of one size")
    inside = project_both_sides(earlier_keys_kkt_sum.detach().to(torch.float64).clone(), projector)
    inside = (inside + inside.T) / 2  # symmetric to rounding, so that eigvalsh reads it as it is
    occupied = int((torch.linalg.eigvalsh(inside) > tolerance).sum())
    occupied = min(occupied, null_space_rank)
    return {"null_space": int(null_space_rank), "occupied": occupied, "left": int(null_space_rank) - occupied}
