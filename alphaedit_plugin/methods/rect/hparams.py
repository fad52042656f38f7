"""RECT's hyperparameters: MEMIT's, plus the share of entries kept and, with P, the order of the two steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...hparams import _help, _require
from ..memit.hparams import MEMITHyperParams

RECT_ORDERS = ("sparsify_then_project", "project_then_sparsify")


@dataclass
class RECTHyperParams(MEMITHyperParams):
    """RECT (Gu et al., EMNLP 2024) on MEMIT: only the top entries of the update by |Δ|/|W| are kept."""

    ALG_NAME: ClassVar[str] = "RECT"
    alg_name: str = _help("Must be RECT.", default="RECT")
    rect_top_fraction: float = _help(
        "Fraction of each update's entries kept, ranked by relative change |Δ_ij|/|W_ij| (the paper's 40%).",
        default=0.4)
    rect_projection_order: str = _help(
        "With projection: sparsify_then_project (default; Δ = (Δ ⊙ M) P keeps ΔK0 ≈ 0 exactly but is no longer "
        "sparse) or project_then_sparsify (keeps the sparsity; ΔK0 ≈ 0 only approximately).",
        default="sparsify_then_project")

    def validate(self) -> None:
        super().validate()
        _require(self, "rect_top_fraction", float, lambda v: 0 < v <= 1, "a number in (0, 1]")
        if self.rect_projection_order not in RECT_ORDERS:
            raise ValueError(f"rect_projection_order must be one of {RECT_ORDERS}, got {self.rect_projection_order!r}")
