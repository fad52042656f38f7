"""The null-space projector P of the preserved knowledge (AlphaEdit Eq. 8-10).

Pure functions: tensors in, tensors out, no model and no I/O.

P = Û Ûᵀ with Û the eigenvectors of the count-normalised second moment
K0K0ᵀ/N whose eigenvalues fall below the threshold. For any preserved key k0,
P k0 ≈ 0, so an update of the form ΔP leaves W k0 unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class NullSpaceError(ValueError):
    pass


@dataclass
class Projector:
    matrix: torch.Tensor  # (d_in, d_in), symmetric and idempotent
    rank: int  # dimension of the kept null space
    eigenvalues: torch.Tensor  # ascending eigenvalues of the second moment (float64)


def null_space_projector(second_moment: torch.Tensor, threshold: float, name: str = "layer") -> Projector:
    """Projector onto the span of eigenvectors of ``second_moment`` with eigenvalue < ``threshold``."""
    if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"{name}: second moment must be a square matrix, got shape {tuple(second_moment.shape)}")
    moment = second_moment.detach().to(torch.float64)
    if not torch.isfinite(moment).all():
        raise NullSpaceError(f"{name}: the second-moment statistics contain NaN or inf; recompute them "
                             "(delete the cached statistics file) and check the model's activations")
    moment = (moment + moment.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    kept = eigenvalues < threshold
    rank = int(kept.sum())
    if rank == 0:
        raise NullSpaceError(
            f"{name}: nullspace_threshold {threshold:g} leaves no null space: all {moment.shape[0]} eigenvalues of "
            f"the second moment are >= {float(eigenvalues[0]):.4g}; raise nullspace_threshold above that value"
        )
    basis = eigenvectors[:, kept]
    matrix = basis @ basis.T
    return Projector(matrix=matrix.to(second_moment.dtype if second_moment.is_floating_point() else torch.float32),
                     rank=rank, eigenvalues=eigenvalues)
