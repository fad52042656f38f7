"""The constrained least-squares solve of AlphaEdit (Eq. 14, with the L2 term).

Pure functions. In the (out, in) orientation of the weight W:

    Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ I)⁻¹

with R = V1 − W K1 the residual of the new facts (d_out × n), K1 their keys
(d_in × n), Kp Kpᵀ the running sum over earlier edits' keys and P the
null-space projector. It is computed as the transpose of

    X = (P (Kp Kpᵀ + K1 K1ᵀ) + λ I)⁻¹ P K1 Rᵀ

by a linear solve in float64 (no explicit inverse). Because
(P A + λ I)⁻¹ P = P (A P + λ I)⁻¹, X = P Y for some Y: the update's rows lie
in the null space, so Δ K0 = Yᵀ P K0 ≈ 0.
"""

from __future__ import annotations

from typing import Optional

import torch


def constrained_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: Optional[torch.Tensor],
    previous_keys_cov: Optional[torch.Tensor],
    l2: float,
) -> torch.Tensor:
    """Return Δ of shape (d_out, d_in).

    keys: (d_in, n); residuals: (d_out, n); projector: (d_in, d_in) or None
    (no projection: P = I); previous_keys_cov: Kp Kpᵀ, (d_in, d_in) or None.
    """
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[1] != residuals.shape[1]:
        raise ValueError(f"keys (d_in, n) and residuals (d_out, n) must share n; got {tuple(keys.shape)} and "
                         f"{tuple(residuals.shape)}")
    d_in = keys.shape[0]
    k = keys.to(torch.float64)
    r = residuals.to(device=k.device, dtype=torch.float64)
    gram = k @ k.T
    if previous_keys_cov is not None:
        gram = gram + previous_keys_cov.to(device=k.device, dtype=torch.float64)
    identity = torch.eye(d_in, dtype=torch.float64, device=k.device)
    if projector is None:
        lhs = gram + l2 * identity
        rhs = k @ r.T
    else:
        p = projector.to(device=k.device, dtype=torch.float64)
        lhs = p @ gram + l2 * identity
        rhs = p @ k @ r.T
    solution = torch.linalg.solve(lhs, rhs)  # (d_in, d_out)
    return solution.T.to(torch.float32)


def preservation_ratio(delta: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor) -> float:
    """‖Δ K0‖_F / ‖W K0‖_F for preserved keys ``keys`` given as rows (m, d_in).

    Δ and W in (out, in) orientation; W is the weight before the update.
    """
    k = keys.to(torch.float64)
    d = delta.to(device=k.device, dtype=torch.float64)
    w = weight.to(device=k.device, dtype=torch.float64)
    return float(torch.linalg.norm(k @ d.T) / torch.linalg.norm(k @ w.T).clamp_min(1e-300))
