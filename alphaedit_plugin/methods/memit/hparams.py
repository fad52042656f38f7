"""MEMIT's hyperparameters, with or without AlphaEdit's projection P.

The shared fields (target search, module templates, statistics corpus,
run time) come from :class:`~alphaedit_plugin.hparams.EditHyperParams`, so
the same yaml keys, cache and EasyEdit hooks apply to every method. MEMIT
adds the weight λ of its λ·C0 prior and the variant switches: ``projection``
(``false`` is the published method, ``true`` inserts P into its solve: the
paper's Section 4.5 "one line"), ``projection_keeps_mom2_term`` and
``memit_steps`` (where the target search and the keys come from). PRUNE and
RECT extend this class with their own fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...hparams import EditHyperParams, _help, _require

STEP_SOURCES = ("plugin", "easyeditor")  # memit_steps


@dataclass
class MEMITHyperParams(EditHyperParams):
    """MEMIT (Meng et al., ICLR 2023): Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹ per layer."""

    ALG_NAME: ClassVar[str] = "MEMIT"
    alg_name: str = _help("Must be MEMIT.", default="MEMIT")

    projection: bool = _help(
        "Insert the null-space projector P into the solve (and carry Kp Kpᵀ of earlier edits): the "
        "AlphaEdit-projected twin of the method. false reproduces the published method.", default=False)
    mom2_update_weight: float = _help(
        "λ of MEMIT's λ·C0 prior in the normal equations (C0: count-normalised K0K0ᵀ).", default=15000.0)
    L2: float = _help("Ridge term of the projected solve (used only with projection: true).", default=10.0)
    projection_keeps_mom2_term: bool = _help(
        "With projection: also keep λ·C0 in the projected solve. false (default) is the paper's one-line change: "
        "P takes over the preservation that λ·C0 did, so the solve is AlphaEdit's, Δ = R K1ᵀ P ((Kp Kpᵀ + K1 K1ᵀ) P "
        "+ L2·I)⁻¹. true constrains twice (P and λ·C0), which measurably weakens the edits (docs/baselines.md).",
        default=False)
    memit_steps: str = _help(
        "Where the target search and the keys come from: plugin (default; batched, runs on CPU and GPU) or "
        "easyeditor (the installed EasyEdit host's own compute_z / compute_ks, called unchanged; only the solve, "
        "where P goes, is the plugin's). easyeditor makes the unprojected variant the host's MEMIT itself.",
        default="plugin")

    def validate(self) -> None:
        super().validate()  # alg_name against this class's ALG_NAME, then the shared fields
        if self.memit_steps not in STEP_SOURCES:
            raise ValueError(f"memit_steps must be one of {STEP_SOURCES}, got {self.memit_steps!r}")
        if not isinstance(self.projection, bool):
            raise ValueError(f"projection must be true or false, got {self.projection!r}")
        if not isinstance(self.projection_keeps_mom2_term, bool):
            raise ValueError(f"projection_keeps_mom2_term must be true or false, got "
                             f"{self.projection_keeps_mom2_term!r}")
        _require(self, "mom2_update_weight", float, lambda v: v > 0, "a number > 0")

    def method_fields(self) -> dict:
        fields = super().method_fields()
        fields["mom2_update_weight"] = self.mom2_update_weight
        fields["alg_name"] = self.alg_name
        return fields

    @property
    def label(self) -> str:
        """``MEMIT``, ``MEMIT+P`` or ``MEMIT+P+λC0`` (``MEMIT@easyeditor``... with the host's steps)."""
        name = self.alg_name + ("@easyeditor" if self.memit_steps == "easyeditor" else "")
        if not self.projection:
            return name
        return name + ("+P+λC0" if self.projection_keeps_mom2_term else "+P")
