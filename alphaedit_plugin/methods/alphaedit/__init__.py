"""AlphaEdit: MEMIT with the null-space projection P (Fang et al., ICLR 2025)."""

from ...registry import register_method
from .apply import apply_alphaedit_to_model, execute_alphaedit
from .hparams import AlphaEditHyperParams
from .method import AlphaEdit

register_method("AlphaEdit", AlphaEditHyperParams, AlphaEdit)

__all__ = ["AlphaEdit", "AlphaEditHyperParams", "apply_alphaedit_to_model", "execute_alphaedit"]
