"""SPHERE: AlphaEdit with a soft projection of the update away from the weight's principal directions.

One of the lifelong-editing methods the current EasyEdit ships
(``easyeditor/models/SPHERE``), here on the plugin's edit loop and state:
its solve is AlphaEdit's, its one step of its own the damping at the write
(:mod:`.soft_projection`). Off by default in the sense that it is a method of
its own (``alg_name: SPHERE``); AlphaEdit keeps its numbers.
"""

from ...registry import register_method
from ..alphaedit import null_space_rule_variants
from .hparams import SPHEREHyperParams
from .method import SPHERE
from .soft_projection import principal_input_directions, soft_project

register_method("SPHERE", SPHEREHyperParams, SPHERE, null_space_rule_variants())

__all__ = ["SPHERE", "SPHEREHyperParams", "principal_input_directions", "soft_project"]
