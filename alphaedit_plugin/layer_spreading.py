"""MEMIT's spreading of the residual over the edited layers (Meng et al., ICLR 2023, Eq. 20).

The target values V1 are searched at the last edited layer. Layer by layer,
from the lowest, each edited layer takes an equal share of what is still
missing there: after the layers below have been updated, the residual
between the target and the current value at the last layer is divided by
the number of layers left (this one included).
"""

from __future__ import annotations

import torch


def spread_residual(targets: torch.Tensor, current: torch.Tensor, position: int, layer_count: int) -> torch.Tensor:
    """The residual layer ``position`` (0-based, of ``layer_count``) solves for: (V1 − current) / layers left.

    targets, current: (n, d_hidden) at the last edited layer.
    """
    if not 0 <= position < layer_count:
        raise ValueError(f"position {position} is not one of the {layer_count} edited layers")
    return (targets - current) / (layer_count - position)
