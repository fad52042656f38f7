"""The null-space projector P of the preserved knowledge (AlphaEdit Eq. 8-10).

Pure functions: tensors in, tensors out, no model and no I/O.

P = Û Ûᵀ with Û the eigenvectors of the count-normalised second moment
K0K0ᵀ/N whose eigenvalues fall below the threshold. For any preserved key k0,
P k0 ≈ 0, so an update of the form ΔP leaves W k0 unchanged.

P is kept in one of two forms:

- ``dense``: the (d, d) matrix, as EasyEdit's AlphaEdit keeps it;
- ``factored`` (:class:`FactoredProjector`): the smaller of its two factors,
  the kept null-space basis Û (P = Û Ûᵀ) or the basis V of its complement
  (P = I − V Vᵀ), d × min(r, d − r), applied as Û(Ûᵀx) or x − V(Vᵀx) without
  forming a d × d matrix. For d = 14,336 (Llama-3-8B's down_proj) the dense P
  is 822 MB in float32; the factored one at most half that, and a quarter
  where the null space takes 3/4 or 1/4 of the directions.

``projector_form(d, "auto")`` picks the factored form for layers of
:data:`FACTORED_FROM_WIDTH` inputs or more. :func:`project_columns` and
:func:`project_both_sides` apply either form (the rows of an update:
:func:`.constrained_solve.project_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


class NullSpaceError(ValueError):
    pass


FORMS = ("auto", "dense", "factored")
RULES = ("threshold", "energy")  # how the null space is chosen: see null_space_mask
FACTORED_FROM_WIDTH = 4096


@dataclass
class FactoredProjector:
    """P = B Bᵀ (``complement`` False: B is the kept null-space basis) or P = I − B Bᵀ (``complement`` True: B
    spans the directions the statistics occupy). B: (d, m) with orthonormal columns."""

    basis: torch.Tensor
    complement: bool

    @property
    def shape(self) -> torch.Size:
        d = self.basis.shape[0]
        return torch.Size((d, d))

    @property
    def device(self) -> torch.device:
        return self.basis.device

    @property
    def dtype(self) -> torch.dtype:
        return self.basis.dtype

    @property
    def rank(self) -> int:
        d, m = self.basis.shape
        return d - m if self.complement else m

    @property
    def nbytes(self) -> int:
        return self.basis.numel() * self.basis.element_size()

    def to(self, *args, **kwargs) -> "FactoredProjector":
        return FactoredProjector(self.basis.to(*args, **kwargs), self.complement)

    def cpu(self) -> "FactoredProjector":
        return self.to("cpu")

    def float(self) -> "FactoredProjector":
        return self.to(torch.float32)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b = self.basis.to(torch.float64)
        inner = b @ b.T
        matrix = torch.eye(b.shape[0], dtype=torch.float64, device=b.device) - inner if self.complement else inner
        return matrix.to(dtype)

    def as_file_entry(self) -> dict:
        """What a tensor-only file stores (read back by :func:`projector_from_file_entry`)."""
        return {"basis": self.basis.contiguous(), "complement": self.complement}


ProjectorTensor = Union[torch.Tensor, FactoredProjector]


@dataclass
class Projector:
    stored: ProjectorTensor  # the dense (d_in, d_in) matrix or its factored form
    rank: int  # dimension of the kept null space
    eigenvalues: torch.Tensor  # ascending eigenvalues of the second moment (float64)

    @property
    def matrix(self) -> torch.Tensor:
        """P as a dense (d_in, d_in) matrix (formed here where it is kept factored)."""
        return self.stored.dense() if isinstance(self.stored, FactoredProjector) else self.stored


def projector_form(d_in: int, form: str = "auto") -> str:
    """``dense`` or ``factored`` for a layer of ``d_in`` inputs; ``auto``: factored from FACTORED_FROM_WIDTH on."""
    if form not in FORMS:
        raise ValueError(f"projector_form must be one of {FORMS}, got {form!r}")
    if form == "auto":
        return "factored" if d_in >= FACTORED_FROM_WIDTH else "dense"
    return form


def null_space_mask(eigenvalues: torch.Tensor, threshold: float, energy: Optional[float] = None) -> torch.Tensor:
    """Which of the ascending ``eigenvalues`` span the null space: those below ``threshold`` (the paper's rule),
    or with ``energy`` the smallest ones whose sum is at most that share of the trace (negative rounding
    noise counted as 0)."""
    if energy is None:
        return eigenvalues < threshold
    spectrum = eigenvalues.clamp_min(0)
    return torch.cumsum(spectrum, 0) <= energy * spectrum.sum()


def null_space_projector(second_moment: torch.Tensor, threshold: float, name: str = "layer",
                         form: str = "dense", energy: Optional[float] = None) -> Projector:
    """Projector onto the span of eigenvectors of ``second_moment`` with eigenvalue < ``threshold`` (or, with
    ``energy``, the smallest ones holding at most that share of its trace; see :func:`null_space_mask`), in
    ``form``.

    The eigendecomposition runs in float64 on the moment's device; the stored form is float32 (dense) or the
    float32 basis (factored)."""
    if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"{name}: second moment must be a square matrix, got shape {tuple(second_moment.shape)}")
    form = projector_form(second_moment.shape[0], form)
    moment = second_moment.detach().to(torch.float64)
    if not torch.isfinite(moment).all():
        raise NullSpaceError(f"{name}: the second-moment statistics contain NaN or inf; recompute them "
                             "(delete the cached statistics file) and check the model's activations")
    moment = (moment + moment.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    del moment
    kept = null_space_mask(eigenvalues, threshold, energy)
    rank = int(kept.sum())
    if rank == 0 and energy is not None:
        smallest = float(eigenvalues[0].clamp_min(0) / eigenvalues.clamp_min(0).sum())
        raise NullSpaceError(f"{name}: nullspace_energy {energy:g} leaves no null space: the smallest eigenvalue "
                             f"alone holds {smallest:.3g} of the trace; raise nullspace_energy above that")
    if rank == 0:
        raise NullSpaceError(
            f"{name}: nullspace_threshold {threshold:g} leaves no null space: all {eigenvectors.shape[0]} eigenvalues "
            f"of the second moment are >= {float(eigenvalues[0]):.4g}; raise nullspace_threshold above that value"
        )
    out_dtype = second_moment.dtype if second_moment.is_floating_point() else torch.float32
    if form == "factored":
        complement = rank > eigenvectors.shape[0] - rank
        basis = eigenvectors[:, ~kept] if complement else eigenvectors[:, kept]
        stored: ProjectorTensor = FactoredProjector(basis.to(torch.float32).contiguous(), complement)
    else:
        basis = eigenvectors[:, kept]
        stored = (basis @ basis.T).to(out_dtype)
    return Projector(stored=stored, rank=rank, eigenvalues=eigenvalues.cpu())


def project_columns(projector: ProjectorTensor, x: torch.Tensor) -> torch.Tensor:
    """P x for x of shape (d, k) (or (d,)), in x's dtype and on x's device."""
    if isinstance(projector, FactoredProjector):
        b = projector.basis.to(device=x.device, dtype=x.dtype)
        inner = b @ (b.T @ x)
        return x - inner if projector.complement else inner
    return projector.to(device=x.device, dtype=x.dtype) @ x


def project_both_sides(matrix: torch.Tensor, projector: ProjectorTensor) -> torch.Tensor:
    """P A P for a symmetric (d, d) ``matrix`` A, in place where P is factored (A's storage is reused: the
    caller passes a matrix it owns)."""
    if not isinstance(projector, FactoredProjector):
        p = projector.to(device=matrix.device, dtype=matrix.dtype)
        return p @ matrix @ p
    b = projector.basis.to(device=matrix.device, dtype=matrix.dtype)
    ab = matrix @ b  # (d, m)
    if projector.complement:
        # (I − BBᵀ) A (I − BBᵀ) = A − B Tᵀ − T Bᵀ with T = AB − ½ B (BᵀAB).
        t = ab.sub_(b @ (b.T @ ab), alpha=0.5)
        matrix.addmm_(b, t.T, alpha=-1).addmm_(t, b.T, alpha=-1)
        return matrix
    return b @ (b.T @ ab) @ b.T


def projector_from_file_entry(entry) -> ProjectorTensor:
    """A stored projector: a dense tensor, or the dict :meth:`FactoredProjector.as_file_entry` wrote."""
    if isinstance(entry, torch.Tensor):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("basis"), torch.Tensor) and "complement" in entry:
        return FactoredProjector(entry["basis"], bool(entry["complement"]))
    raise ValueError(f"not a stored projector: {type(entry).__name__}")


def projector_file_entry(projector: ProjectorTensor):
    """The tensor-only form of ``projector`` for torch.save (weights_only loading)."""
    if isinstance(projector, FactoredProjector):
        return projector.cpu().as_file_entry()
    return projector.cpu()
