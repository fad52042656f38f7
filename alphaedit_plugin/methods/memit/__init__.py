"""MEMIT (Meng et al., ICLR 2023), with and without AlphaEdit's projection P."""

from ...registry import Variant, register_method
from .hparams import MEMITHyperParams
from .method import MEMIT


def memit_family_variants():
    """The settings tables list as methods of their own: ``+P`` (projection) and ``@easyeditor`` (the host's
    target search and keys), and both together."""
    return (
        Variant(),
        Variant("+P", "-projected", {"projection": True}),
        Variant("@easyeditor", "-easyeditor", {"memit_steps": "easyeditor"}),
        Variant("@easyeditor+P", "-easyeditor-projected", {"memit_steps": "easyeditor", "projection": True}),
    )


register_method("MEMIT", MEMITHyperParams, MEMIT, memit_family_variants())

__all__ = ["MEMIT", "MEMITHyperParams", "memit_family_variants"]
