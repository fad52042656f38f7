"""The constrained least-squares solve of AlphaEdit (Eq. 14, with the L2 term), and MEMIT's as its special case.

Pure functions. In the (out, in) orientation of the weight W:

    Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ I)⁻¹

with R = V1 − W K1 the residual of the new facts (d_out × n), K1 their keys
(d_in × n), Kp Kpᵀ the running sum over earlier edits' keys and P the
null-space projector. It is computed as the transpose of X, the solution of

    (P A + λ I) X = P K1 Rᵀ,    A = Kp Kpᵀ + K1 K1ᵀ,

by a linear solve in float64 (no explicit inverse). Because
(P A + λ I)⁻¹ P = P (A P + λ I)⁻¹, X = P Y for some Y: the update's rows lie
in the null space, so Δ K0 = Yᵀ P K0 ≈ 0.

With P kept factored (:mod:`.null_space_projector`) the same X solves the
symmetric system (P A P + λ I) X = P K1 Rᵀ: from the first equation
λX = P(K1Rᵀ − A X) lies in the null space, so X = P X and P A P X = P A X.
That form applies P from its factors and never forms a d × d P. The dense
form keeps the paper's system, computed with the same floating-point
operations as earlier versions, so that their results stay bit for bit.

Memory for d inputs: the float64 matrix A (8·d² bytes, built in place; a
float32 Kp Kpᵀ is widened as it is added, without a float64 copy), the
solve's LU copy of it, and d × d_out right-hand sides; all on the keys'
device (the edited layer's) and freed on return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .null_space_projector import FactoredProjector, ProjectorTensor, project_both_sides, project_columns


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
    projector: Optional[ProjectorTensor],
    extra_gram: Optional[torch.Tensor],
    l2: float,
) -> torch.Tensor:
    """Return Δ of shape (d_out, d_in).

    keys: (d_in, n); residuals: (d_out, n); projector: P, dense (d_in, d_in) or factored, or None (no
    projection: P = I); extra_gram: what is added to K1 K1ᵀ, (d_in, d_in) or None: Kp Kpᵀ for AlphaEdit,
    λ·C0 for MEMIT, both for MEMIT+P+λC0. Everything is moved to the keys' device.
    """
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[1] != residuals.shape[1]:
        raise ValueError(f"keys (d_in, n) and residuals (d_out, n) must share n; got {tuple(keys.shape)} and "
                         f"{tuple(residuals.shape)}")
    k = keys.to(torch.float64)
    gram = k @ k.T
    if extra_gram is not None:
        gram.add_(extra_gram.to(k.device))  # a float32 term is widened exactly, without a float64 copy
    return _solve_owned(gram, k, residuals, projector, l2)


def _solve_owned(gram: torch.Tensor, k: torch.Tensor, residuals: torch.Tensor,
                 projector: Optional[ProjectorTensor], l2: float) -> torch.Tensor:
    """The solve on ``gram`` = A (float64, on k's device), which it may overwrite.

    A dense P takes the paper's form (P A + λ I) X = P K1 Rᵀ, computed exactly as earlier versions did (the
    same floating-point operations, so that results stay bit for bit); a factored P the symmetric form
    (P A P + λ I) X = P K1 Rᵀ, the same X (module docstring), without a d × d P.
    """
    r = residuals.to(device=k.device, dtype=torch.float64)
    if projector is None:
        lhs, rhs = gram, k @ r.T
    elif isinstance(projector, FactoredProjector):
        lhs, rhs = project_both_sides(gram, projector), project_columns(projector, k @ r.T)
    else:
        p = projector.to(device=k.device, dtype=torch.float64)
        lhs, rhs = p @ gram, p @ k @ r.T
    del gram
    lhs.diagonal().add_(l2)
    solution = torch.linalg.solve(lhs, rhs)  # (d_in, d_out)
    del lhs
    return solution.T.to(torch.float32)


def solve_with_terms(keys: torch.Tensor, residuals: torch.Tensor, terms: SolveTerms,
                     projector: Optional[ProjectorTensor] = None, earlier_keys_kkt_sum: Optional[torch.Tensor] = None,
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
    if terms.mom2_prior_weight is not None:
        extra = terms.mom2_prior_weight * second_moment.to(device=keys.device, dtype=torch.float64)
    if terms.earlier_keys:
        kkt = earlier_keys_kkt_sum.to(keys.device)
        extra = kkt if extra is None else extra.add_(kkt)  # float32 widened exactly, no float64 copy
    return constrained_update(keys, residuals, projector if terms.projection else None, extra, terms.ridge)


def project_rows(delta: torch.Tensor, projector: ProjectorTensor) -> torch.Tensor:
    """Δ P: the rows of an (out, in) update projected onto the null space (in float64, returned in Δ's dtype);
    P dense or factored."""
    if len(projector.shape) != 2 or projector.shape[0] != projector.shape[1] or projector.shape[0] != delta.shape[-1]:
        raise ValueError(f"projector of shape {tuple(projector.shape)} does not fit an update with "
                         f"{delta.shape[-1]} inputs")
    rows = delta.to(torch.float64)
    if isinstance(projector, FactoredProjector):
        return project_columns(projector, rows.T).T.to(delta.dtype)  # P is symmetric: Δ P = (P Δᵀ)ᵀ
    return (rows @ projector.to(device=delta.device, dtype=torch.float64)).to(delta.dtype)


def preservation_ratio(delta: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor) -> float:
    """‖Δ K0‖_F / ‖W K0‖_F for preserved keys ``keys`` given as rows (m, d_in).

    Δ and W in (out, in) orientation; W is the weight before the update.
    """
    k = keys.to(torch.float64)
    d = delta.to(device=k.device, dtype=torch.float64)
    w = weight.to(device=k.device, dtype=torch.float64)
    return float(torch.linalg.norm(k @ d.T) / torch.linalg.norm(k @ w.T).clamp_min(1e-300))
