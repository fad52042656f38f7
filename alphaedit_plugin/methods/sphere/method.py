"""SPHERE on the plugin's edit loop: AlphaEdit's solve, then the soft projection where the update is written.

The one step SPHERE supplies is :meth:`SPHERE.combine`: each layer's solved
update Δ (in the null space of K0, as AlphaEdit's) is written as
Δ (I − α U Uᵀ), U from the weight as it is just before the write. As in the
host, the layers above read their keys with the undamped updates of the
layers below (the loop's ``finalize`` would damp them first), and Kp Kpᵀ
gets the same keys AlphaEdit's would.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch

from ..alphaedit.method import AlphaEdit
from ..base import TensorsByLayer
from .soft_projection import principal_input_directions, soft_project


class SPHERE(AlphaEdit):
    """AlphaEdit whose update is damped along the weight's principal input directions when written."""

    def combine(self, deltas: Mapping[int, torch.Tensor], weights: Mapping[int, torch.Tensor],
                state) -> Tuple[TensorsByLayer, Dict[str, TensorsByLayer]]:
        if not self.hparams.damps:
            return dict(deltas), {}
        changes = {}
        for layer, delta in deltas.items():
            directions = principal_input_directions(weights[layer], self.hparams.cumulative_ratio)
            changes[layer] = soft_project(delta, directions, self.hparams.suppression_strength)
        return changes, {}
