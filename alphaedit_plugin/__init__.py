"""AlphaEdit (Fang et al., ICLR 2025): null-space constrained knowledge editing, as an EasyEdit plugin.

Every method (AlphaEdit; MEMIT, PRUNE and RECT, each with and without
AlphaEdit's null-space projection P) is a registered part of one edit loop::

    from alphaedit_plugin import load_hparams, create_state, apply_to_model
    hparams = load_hparams("hparams/AlphaEdit/smollm2-135m.yaml")     # the class follows alg_name
    state = create_state(model, tok, hparams)
    model, _ = apply_to_model(model, tok, requests, hparams, state=state)
"""

from . import methods  # noqa: F401  (registers AlphaEdit, MEMIT, PRUNE, RECT)
from .edit_loop import (LayerUpdates, apply_to_model, compute_update, create_state, edit_in_place,
                        state_identity, validate_setup)
from .errors import DeltaError, EditError, ProjectorMismatchError, StateMismatchError
from .hparams import EditHyperParams
from .methods.alphaedit import AlphaEditHyperParams, apply_alphaedit_to_model, execute_alphaedit
from .methods.memit import MEMITHyperParams
from .methods.prune import PRUNEHyperParams
from .methods.rect import RECTHyperParams
from .registry import load_hparams, register_method
from .requests import EditRequest, RequestError, normalise_requests
from .state import AlphaEditState, EditingState, EditRecord

AlphaEditUpdate = LayerUpdates  # its name before every method shared it

__all__ = [
    "AlphaEditHyperParams",
    "AlphaEditState",
    "AlphaEditUpdate",
    "DeltaError",
    "EditError",
    "EditHyperParams",
    "EditRecord",
    "EditRequest",
    "EditingState",
    "LayerUpdates",
    "MEMITHyperParams",
    "PRUNEHyperParams",
    "ProjectorMismatchError",
    "RECTHyperParams",
    "RequestError",
    "StateMismatchError",
    "apply_alphaedit_to_model",
    "apply_to_model",
    "compute_update",
    "create_state",
    "edit_in_place",
    "execute_alphaedit",
    "load_hparams",
    "normalise_requests",
    "register_method",
    "state_identity",
    "validate_setup",
]

__version__ = "0.2.0"

# Where the EasyEdit host is importable, importing the package registers every method in its ALG_DICT
# (idempotent; a missing host is fine, a broken one only logs a warning).
from .hosts.easyedit.autoregister import register_if_available as _register_with_easyedit  # noqa: E402

_register_with_easyedit()
