"""MEMIT (Meng et al., ICLR 2023): Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹ per layer (their Eq. 14), and MEMIT+P.

MEMIT supplies to the edit loop only its solve's terms: the λ·C0 prior that
keeps the outputs of the preserved keys W K0 in place softly, and no
projection. With ``projection: true`` the terms are AlphaEdit's (the one
line of the AlphaEdit paper): P replaces the prior and the earlier edits'
keys are carried, so MEMIT+P *is* AlphaEdit
(:func:`~alphaedit_plugin.constrained_solve.with_projection` makes both).
Everything else the host's MEMIT does (context-prefix averaged keys at the
subject's last token, one target search at the last edited layer, the
residual spread evenly over the remaining layers, each layer's update in
place before the next layer's keys are read) is the edit loop's.

Where the steps come from: the plugin's own (batched target search,
context-averaged keys) by default; with ``memit_steps: easyeditor`` the
EasyEdit host's ``compute_z`` and ``compute_ks`` themselves
(:mod:`alphaedit_plugin.hosts.easyedit.memit_steps`).
"""

from __future__ import annotations

from typing import Any, Dict

from ...constrained_solve import SolveTerms, memit_terms, with_projection
from ..base import EditMethod, PluginSteps


class MEMIT(EditMethod):
    """MEMIT, and with ``projection: true`` the same method with the null-space projection P."""

    def identity(self) -> Dict[str, Any]:
        return {"mom2_update_weight": self.hparams.mom2_update_weight}

    def steps(self):
        if getattr(self.hparams, "memit_steps", "plugin") == "easyeditor":
            from ...hosts.easyedit.memit_steps import EasyEditMEMITSteps

            return EasyEditMEMITSteps(self.hparams)
        return PluginSteps(self.hparams)

    def solve_terms(self) -> SolveTerms:
        terms = memit_terms(self.hparams.mom2_update_weight)
        if not self.hparams.projection:
            return terms
        return with_projection(terms, ridge=self.hparams.L2, keep_mom2_prior=self.hparams.projection_keeps_mom2_term)
