"""The errors an edit can end with; each says that nothing was changed, and why."""

from __future__ import annotations


class EditError(RuntimeError):
    """An edit could not be computed or written; the model's weights and the state are unchanged."""


class DeltaError(EditError):
    """A method produced no update, or one that does not fit the weight; nothing was written."""


class StateMismatchError(ValueError):
    """An editing state was made for another method, model, layer set, corpus or threshold."""


class ProjectorMismatchError(ValueError):
    """A projector does not belong to the layer (or model) it is used for."""

