"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with the null-space projection P, by construction.

AlphaEdit's solve, Δ = R K1ᵀ P ((Kp Kpᵀ + K1 K1ᵀ) P + L2·I)⁻¹ (its Eq. 14),
is MEMIT's with the paper's one-line change
(:func:`~alphaedit_plugin.constrained_solve.with_projection`); the target
search, the keys, the spreading over layers and the write are MEMIT's,
done by the edit loop. So AlphaEdit is the MEMIT method class with the
projection always on; MEMIT+P computes exactly the same updates (tested).
"""

from __future__ import annotations

from typing import Any, Dict

from ...constrained_solve import SolveTerms, memit_terms, with_projection
from ..base import PluginSteps
from ..memit.method import MEMIT


class AlphaEdit(MEMIT):
    """MEMIT whose solve always has P (and the earlier edits' keys); λ·C0 is not part of it."""

    def identity(self) -> Dict[str, Any]:
        return {}

    def steps(self):
        return PluginSteps(self.hparams)

    def solve_terms(self) -> SolveTerms:
        return with_projection(memit_terms(self.hparams.mom2_update_weight), ridge=self.hparams.L2)
