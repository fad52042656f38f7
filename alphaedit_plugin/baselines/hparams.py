"""Hyperparameters of the MEMIT, PRUNE and RECT executors, each with or without the projection P.

Each class extends :class:`alphaedit_plugin.AlphaEditHyperParams`: the
target search, module templates, statistics corpus and run-time fields are
the same (so the same yaml keys, the same cache and the same EasyEdit hooks
apply), and each adds its own method fields. ``projection`` selects the
variant: ``false`` is the published method, ``true`` inserts AlphaEdit's
null-space projector P into its solve (the paper's Section 4.5 "one line").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Tuple, Union

import yaml

from ..hparams import AlphaEditHyperParams, _help, _require

RECT_ORDERS = ("sparsify_then_project", "project_then_sparsify")
STEP_SOURCES = ("plugin", "easyeditor")  # memit_steps


@dataclass
class BaselineHyperParams(AlphaEditHyperParams):
    """Shared fields of the MEMIT family executors (not used directly)."""

    ALG_NAME: ClassVar[str] = ""

    projection: bool = _help(
        "Insert the null-space projector P into the solve (and carry Kp Kpᵀ of earlier edits): the "
        "AlphaEdit-projected twin of the method. false reproduces the published method.", default=False)
    mom2_update_weight: float = _help(
        "λ of MEMIT's preservation term λ·C0 in the normal equations (C0: count-normalised K0K0ᵀ).", default=15000.0)
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
        fields["projection"] = self.projection
        fields["projection_keeps_mom2_term"] = self.projection_keeps_mom2_term
        fields["memit_steps"] = self.memit_steps
        return fields

    @property
    def label(self) -> str:
        """``MEMIT``, ``MEMIT+P`` or ``MEMIT+P+λC0`` (``MEMIT@easyeditor``... with the host's steps): how tables
        and logs name the variant."""
        name = self.alg_name + ("@easyeditor" if self.memit_steps == "easyeditor" else "")
        if not self.projection:
            return name
        return name + ("+P+λC0" if self.projection_keeps_mom2_term else "+P")


@dataclass
class MEMITHyperParams(BaselineHyperParams):
    """MEMIT (Meng et al., ICLR 2023): Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹ per layer."""

    ALG_NAME: ClassVar[str] = "MEMIT"
    alg_name: str = _help("Must be MEMIT.", default="MEMIT")


@dataclass
class PRUNEHyperParams(BaselineHyperParams):
    """PRUNE (Ma et al., ICLR 2025) on MEMIT: the accumulated update's large singular values are restrained."""

    ALG_NAME: ClassVar[str] = "PRUNE"
    alg_name: str = _help("Must be PRUNE.", default="PRUNE")
    prune_log_base: float = _help(
        "Base α of the restraint F(σ) = log_α(σ) − log_α(σ_max(W)) + σ_max(W), applied to the singular "
        "values σ of the accumulated update that exceed the original weight's largest singular value "
        "(the PRUNE paper's default is the natural log, α = e).", default=2.718281828459045)

    def validate(self) -> None:
        super().validate()
        _require(self, "prune_log_base", float, lambda v: v > 1, "a number > 1")


@dataclass
class RECTHyperParams(BaselineHyperParams):
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


HPARAMS_CLASSES: Tuple[type, ...] = (MEMITHyperParams, PRUNEHyperParams, RECTHyperParams)


def hparams_class_for(alg_name: str) -> type:
    for cls in HPARAMS_CLASSES:
        if cls.ALG_NAME == alg_name:
            return cls
    raise ValueError(f"alg_name must be one of {[c.ALG_NAME for c in HPARAMS_CLASSES]}, got {alg_name!r}")


def load_hparams(path: Union[str, os.PathLike]) -> BaselineHyperParams:
    """Read a yaml file of any of the three methods (the class is chosen by its alg_name)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    if not path.is_file():
        raise FileNotFoundError(f"hparams file not found: {path}")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of hparams fields, got {type(config).__name__}")
    return hparams_class_for(config.get("alg_name")).from_dict(config, source=str(path))
