"""AlphaEdit: MEMIT with the null-space projection P (Fang et al., ICLR 2025)."""

from ...registry import Variant, register_method
from .apply import apply_alphaedit_to_model, execute_alphaedit
from .hparams import AlphaEditHyperParams
from .method import AlphaEdit


def null_space_rule_variants():
    """The paper's absolute threshold, and ``+energy``: each layer's null space holds the same share of its
    keys' energy (``nullspace_rule: energy``)."""
    return (Variant(), Variant("+energy", "-energy", {"nullspace_rule": "energy"}))


register_method("AlphaEdit", AlphaEditHyperParams, AlphaEdit, null_space_rule_variants())

__all__ = ["AlphaEdit", "AlphaEditHyperParams", "apply_alphaedit_to_model", "execute_alphaedit",
           "null_space_rule_variants"]
