"""SPHERE's hyperparameters: AlphaEdit's, plus the share of the weight's spectrum damped and by how much."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...hparams import _help, _require
from ..alphaedit.hparams import AlphaEditHyperParams


@dataclass
class SPHEREHyperParams(AlphaEditHyperParams):
    """AlphaEdit whose update is also damped along the weight's principal input directions (the field names
    are the current EasyEdit's, so its SPHERE yaml files load as they are)."""

    ALG_NAME: ClassVar[str] = "SPHERE"
    alg_name: str = _help("Must be SPHERE.", default="SPHERE")
    cumulative_ratio: float = _help(
        "η: the principal directions damped are the top eigenvectors of the row-normalised weight's Gram matrix "
        "covering this share of its trace (EasyEdit's SPHERE yaml: 0.5). 0 with suppression_strength 0: "
        "AlphaEdit's update unchanged.", default=0.5)
    suppression_strength: float = _help(
        "α: the share of the update along those directions taken away (1: all of it; 0: none).", default=0.5)

    def validate(self) -> None:
        super().validate()
        _require(self, "cumulative_ratio", float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _require(self, "suppression_strength", float, lambda v: 0 <= v <= 1, "a number in [0, 1]")

    @property
    def damps(self) -> bool:
        """Whether the soft projection is on (EasyEdit's rule: both numbers above 0)."""
        return self.cumulative_ratio > 0 and self.suppression_strength > 0
