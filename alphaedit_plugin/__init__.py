"""AlphaEdit (Fang et al., ICLR 2025): null-space constrained knowledge editing, as an EasyEdit plugin."""

from .alphaedit_main import (
    AlphaEditUpdate,
    EditError,
    apply_alphaedit_to_model,
    create_state,
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
    "execute_alphaedit",
    "normalise_requests",
]

__version__ = "0.1.0"
