"""PRUNE (Ma et al., ICLR 2025) on MEMIT, with and without AlphaEdit's projection P."""

from ...registry import register_method
from ..memit import memit_family_variants
from .hparams import PRUNEHyperParams
from .method import PRUNE
from .restraint import largest_sv, restrain_singular_values, restraint

register_method("PRUNE", PRUNEHyperParams, PRUNE, memit_family_variants())

__all__ = ["PRUNE", "PRUNEHyperParams", "largest_sv", "restrain_singular_values", "restraint"]
