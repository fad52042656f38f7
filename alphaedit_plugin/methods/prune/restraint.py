"""PRUNE's singular-value restraint (Ma et al., "Perturbation-restrained sequential model editing", ICLR 2025).

Pure functions.

Sequential edits accumulate an update ΔW_n = Σ_j Δ_j whose largest singular
values grow with n, and with them the condition number of W + ΔW_n and the
damage to the model's general abilities. PRUNE keeps the model at
W + F(ΔW_n), where F leaves every singular value of ΔW_n below the original
weight's largest one, σ̄ = σ_max(W), unchanged and maps the larger ones
through a slowly growing log:

    F(σ) = log_α(σ) − log_α(σ̄) + σ̄      for σ ≥ σ̄,     F(σ) = σ otherwise

(the paper's "log" restraint; α = e by default, ``prune_log_base``). F is
continuous at σ̄, increasing, and F(σ) ≤ σ, so the restrained total never
exceeds the unrestrained one in any direction.

Here each call solves MEMIT's update on the model as it stands, adds it to
the unrestrained running total kept in the state (``raw_totals``), and
writes W + F(total) (:mod:`.method`). (PRUNE's released code restrains the total of a run
made without restraint, a copy of the model it keeps on disk; a plugin edits
the user's one model, so the updates are solved on the restrained model.)

With the projection P every Δ_j has its rows in the range of P, hence so has
the total and its right singular vectors; F changes singular values only, so
F(total) keeps its rows there too: the restraint preserves ΔW·K0 ≈ 0, and no
second projection is needed.
"""

from __future__ import annotations

import math
import torch


def restraint(sigma: torch.Tensor, sigma_bar: float, base: float = math.e) -> torch.Tensor:
    """F applied element-wise to singular values ``sigma`` (see the module docstring)."""
    sigma = sigma.to(torch.float64)
    restrained = torch.log(sigma.clamp_min(sigma_bar)) / math.log(base) - math.log(sigma_bar) / math.log(base) + sigma_bar
    return torch.where(sigma >= sigma_bar, restrained, sigma)


def restrain_singular_values(total: torch.Tensor, sigma_bar: float, base: float = math.e) -> torch.Tensor:
    """U F(Σ) Vᵀ for ``total`` = U Σ Vᵀ, keeping the numerically non-zero singular directions only."""
    if total.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(total.shape)}")
    if not sigma_bar > 0:
        raise ValueError(f"the original weight's largest singular value must be > 0, got {sigma_bar}")
    matrix = total.to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return matrix.clone()
    tolerance = float(s[0]) * max(matrix.shape) * torch.finfo(torch.float64).eps
    rank = int((s > tolerance).sum())
    if float(s[0]) < sigma_bar:
        return matrix.clone()  # nothing to restrain: leave the total bit for bit
    restrained = restraint(s[:rank], sigma_bar, base)
    return (u[:, :rank] * restrained) @ vh[:rank]


def largest_sv(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.to(torch.float64), ord=2))
