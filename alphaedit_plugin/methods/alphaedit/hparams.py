"""AlphaEdit's hyperparameters: the shared fields, under ``alg_name: AlphaEdit``.

AlphaEdit adds no field of its own: its null-space threshold and ridge
(``nullspace_threshold``, ``L2``) are shared with every method that can take
the projection P (MEMIT+P, PRUNE+P, RECT+P), so they live in
:class:`~alphaedit_plugin.hparams.EditHyperParams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

from ...hparams import EditHyperParams, _help

ALG_NAME = "AlphaEdit"


@dataclass
class AlphaEditHyperParams(EditHyperParams):
    """Everything AlphaEdit needs to edit one model (Fang et al., ICLR 2025)."""

    ALG_NAME: ClassVar[str] = ALG_NAME
    UNUSED_FIELDS: ClassVar[Tuple[str, ...]] = EditHyperParams.UNUSED_FIELDS + ("mom2_update_weight",)
    alg_name: str = _help("Must be AlphaEdit.", default=ALG_NAME)

    @property
    def label(self) -> str:
        """``AlphaEdit``, or ``AlphaEdit+energy`` with the null space chosen by energy share."""
        return self.alg_name + ("+energy" if self.nullspace_rule == "energy" else "")
