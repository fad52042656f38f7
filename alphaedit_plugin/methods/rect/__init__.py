"""RECT (Gu et al., EMNLP 2024) on MEMIT, with and without AlphaEdit's projection P."""

from ...registry import register_method
from ..memit import memit_family_variants
from .hparams import RECTHyperParams
from .method import RECT
from .sparsify import relative_change_mask, sparsify_by_relative_change

register_method("RECT", RECTHyperParams, RECT, memit_family_variants())

__all__ = ["RECT", "RECTHyperParams", "relative_change_mask", "sparsify_by_relative_change"]
