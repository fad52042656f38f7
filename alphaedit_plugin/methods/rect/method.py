"""RECT on MEMIT: each layer's solved update keeps only its top entries by relative change.

RECT supplies to the edit loop one step, :meth:`RECT.finalize`, run on each
layer's update after its solve and before the next layer's keys are read.
With P the order of sparsifying and projecting is the ``rect_projection_order``
choice (see :mod:`.sparsify`).
"""

from __future__ import annotations

import torch

from ...constrained_solve import project_rows
from ..memit.method import MEMIT
from .sparsify import sparsify_by_relative_change


class RECT(MEMIT):
    """MEMIT's update, of which only the top entries by relative change are written."""

    def finalize(self, layer: int, delta: torch.Tensor, weight: torch.Tensor, state) -> torch.Tensor:
        delta = sparsify_by_relative_change(delta, weight, self.hparams.rect_top_fraction)
        if self.hparams.projection and self.hparams.rect_projection_order == "sparsify_then_project":
            # Zeroing entries mixes the directions of a row: project again to keep ΔK0 ≈ 0.
            delta = project_rows(delta, state.projector_for(layer, delta.shape[1]))
        return delta
