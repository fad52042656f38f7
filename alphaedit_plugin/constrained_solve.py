"""The constrained least-squares solve of AlphaEdit (Eq. 14, with the L2 term), and MEMIT's as its special case.

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

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SolveTerms:
    """Which terms a method's normal equations have; every method of the family solves

        Δ = R K1ᵀ P ((λ C0 + Kp Kpᵀ + K1 K1ᵀ) P + ridge·I)⁻¹

    - ``projection``: P, AlphaEdit's null-space projector (without it, P = I);
    - ``mom2_prior_weight``: λ of MEMIT's λ·C0 prior, which keeps the preserved keys' outputs W K0 in
      place softly (None: no such term);
    - ``earlier_keys``: Kp Kpᵀ, the keys of earlier edits (AlphaEdit carries them);
    - ``ridge``: the L2 term.

    MEMIT is ``SolveTerms(False, λ, False, 0)``; AlphaEdit and MEMIT+P are ``SolveTerms(True, None, True, L2)``.
    """

    projection: bool
    mom2_prior_weight: Optional[float]
    earlier_keys: bool
    ridge: float


def memit_terms(mom2_prior_weight: float) -> SolveTerms:
    """MEMIT's normal equations: R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹, no projection, no ridge."""
    return SolveTerms(projection=False, mom2_prior_weight=mom2_prior_weight, earlier_keys=False, ridge=0.0)


def with_projection(terms: SolveTerms, ridge: float, keep_mom2_prior: bool = False) -> SolveTerms:
    """The AlphaEdit paper's one line: P enters the solve and takes over what the λ·C0 prior did (which leaves,
    unless ``keep_mom2_prior``), the earlier edits' keys are carried, and the ridge keeps the solve well posed."""
    return SolveTerms(projection=True, mom2_prior_weight=terms.mom2_prior_weight if keep_mom2_prior else None,
                      earlier_keys=True, ridge=ridge)


def constrained_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: Optional[torch.Tensor],
    extra_gram: Optional[torch.Tensor],
    l2: float,
) -> torch.Tensor:
    """Return Δ of shape (d_out, d_in).

    keys: (d_in, n); residuals: (d_out, n); projector: (d_in, d_in) or None
    (no projection: P = I); extra_gram: what is added to K1 K1ᵀ, (d_in, d_in)
    or None: Kp Kpᵀ for AlphaEdit, λ·C0 for MEMIT, both for MEMIT+P+λC0.
    """
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[1] != residuals.shape[1]:
        raise ValueError(f"keys (d_in, n) and residuals (d_out, n) must share n; got {tuple(keys.shape)} and "
                         f"{tuple(residuals.shape)}")
    d_in = keys.shape[0]
    k = keys.to(torch.float64)
    r = residuals.to(device=k.device, dtype=torch.float64)
    gram = k @ k.T
    if extra_gram is not None:
        gram = gram + extra_gram.to(device=k.device, dtype=torch.float64)
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


def solve_with_terms(keys: torch.Tensor, residuals: torch.Tensor, terms: SolveTerms,
                     projector: Optional[torch.Tensor] = None, earlier_keys_kkt_sum: Optional[torch.Tensor] = None,
                     second_moment: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Δ = R K1ᵀ P ((λ C0 + Kp Kpᵀ + K1 K1ᵀ) P + ridge·I)⁻¹ with the terms ``terms`` has.

    keys: (d_in, n); residuals: (d_out, n); projector P, earlier_keys_kkt_sum Kp Kpᵀ and second_moment C0:
    (d_in, d_in), each needed only where ``terms`` has it.
    """
    needed = {"projector": terms.projection, "earlier_keys_kkt_sum": terms.earlier_keys,
              "second_moment": terms.mom2_prior_weight is not None}
    given = {"projector": projector, "earlier_keys_kkt_sum": earlier_keys_kkt_sum, "second_moment": second_moment}
    missing = [name for name, need in needed.items() if need and given[name] is None]
    if missing:
        raise ValueError(f"the solve {terms} needs {missing}")
    extra = None
    if terms.earlier_keys:
        extra = earlier_keys_kkt_sum.to(torch.float64)
    if terms.mom2_prior_weight is not None:
        prior = (terms.mom2_prior_weight * second_moment).to(torch.float64)
        extra = prior if extra is None else extra + prior.to(extra.device)
    return constrained_update(keys=keys, residuals=residuals, projector=projector if terms.projection else None,
                              extra_gram=extra, l2=terms.ridge)


def project_rows(delta: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """Δ P: the rows of an (out, in) update projected onto the null space (in float64, returned in Δ's dtype)."""
    if projector.ndim != 2 or projector.shape[0] != projector.shape[1] or projector.shape[0] != delta.shape[-1]:
        raise ValueError(f"projector of shape {tuple(projector.shape)} does not fit an update with "
                         f"{delta.shape[-1]} inputs")
    return (delta.to(torch.float64) @ projector.to(device=delta.device, dtype=torch.float64)).to(delta.dtype)


def preservation_ratio(delta: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor) -> float:
    """‖Δ K0‖_F / ‖W K0‖_F for preserved keys ``keys`` given as rows (m, d_in).

    Δ and W in (out, in) orientation; W is the weight before the update.
    """
    k = keys.to(torch.float64)
    d = delta.to(device=k.device, dtype=torch.float64)
    w = weight.to(device=k.device, dtype=torch.float64)
    return float(torch.linalg.norm(k @ d.T) / torch.linalg.norm(k @ w.T).clamp_min(1e-300))
