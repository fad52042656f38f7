"""PRUNE's hyperparameters: MEMIT's, plus the base of its singular-value restraint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...hparams import _help, _require
from ..memit.hparams import MEMITHyperParams


@dataclass
class PRUNEHyperParams(MEMITHyperParams):
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
