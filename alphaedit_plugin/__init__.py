"""AlphaEdit (Fang et al., ICLR 2025): null-space constrained knowledge editing, as an EasyEdit plugin."""

from .alphaedit_main import (
    AlphaEditUpdate,
    EditError,
    apply_alphaedit_to_model,
    create_state,
    edit_in_place,
    execute_alphaedit,
)
from .hparams import AlphaEditHyperParams
from .requests import EditRequest, RequestError, normalise_requests
from .state import AlphaEditState, EditRecord, StateMismatchError

__all__ = [
    "AlphaEditHyperParams",
    "AlphaEditState",
    "AlphaEditUpdate",
    "EditError",
    "EditRecord",
    "EditRequest",
    "RequestError",
    "StateMismatchError",
    "apply_alphaedit_to_model",
    "create_state",
    "edit_in_place",
    "execute_alphaedit",
    "normalise_requests",
]

__version__ = "0.1.0"

# Where the EasyEdit host is installed, importing the package registers the editor in its
# ALG_DICT (idempotent; a missing host is fine, a broken one only logs a warning).
from .easyedit.autoregister import register_if_available as _register_with_easyedit  # noqa: E402

_register_with_easyedit()
