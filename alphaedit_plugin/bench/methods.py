"""The editing methods the benchmark runner can run, by name.

A method is registered with one call::

    from alphaedit_plugin.bench import register_method
    register_method("MEMIT", lambda model, tok, options: MyMemitMethod(model, tok, options))

The factory gets the model, the tokenizer and :class:`MethodOptions` and
returns an :class:`EditMethod`. The runner restores the parameters named by
``edited_parameters()`` between methods, saves them after every finished
batch together with whatever ``save_state`` writes, and on resume loads both
back (``load_state``) instead of calling ``prepare``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

logger = logging.getLogger(__name__)


@dataclass
class MethodOptions:
    hparams: Any = None  # a yaml path or a hyperparameter object (AlphaEdit: AlphaEditHyperParams)
    overrides: Dict[str, Any] = field(default_factory=dict)  # hparams fields to replace
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)  # anything else a method needs


class EditMethod:
    """Base class: a stateful editor bound to one model."""

    name = "method"

    def __init__(self, model, tok, options: MethodOptions):
        self.model, self.tok, self.options = model, tok, options

    def prepare(self) -> None:
        """One-time set-up before the first batch of a fresh run (statistics, projectors)."""

    def edited_parameters(self) -> List[str]:
        """Names (``model.named_parameters()``) of every parameter ``edit`` may change."""
        return []

    def edit(self, requests: List[Dict[str, Any]]) -> None:
        """Apply one batch of ROME-form requests to the model in place."""
        raise NotImplementedError

    def save_state(self, folder: Path) -> None:
        """Write what later batches need (besides the weights) into ``folder``."""

    def load_state(self, folder: Path) -> None:
        """Read back what ``save_state`` wrote."""

    def describe(self) -> Dict[str, Any]:
        """Settings recorded in the results."""
        return {}


class UneditedMethod(EditMethod):
    """Makes no edit: the baseline row (the unedited model scored like the others)."""

    name = "unedited"

    def edit(self, requests):
        return None


class AlphaEditMethod(EditMethod):
    """AlphaEdit with one persistent :class:`~alphaedit_plugin.AlphaEditState` across batches."""

    name = "AlphaEdit"
    STATE_FILE = "alphaedit_state.pt"

    def __init__(self, model, tok, options: MethodOptions):
        super().__init__(model, tok, options)
        from ..hparams import AlphaEditHyperParams

        if options.hparams is None:
            raise ValueError("AlphaEdit needs hyperparameters: pass --hparams PATH (e.g. hparams/AlphaEdit/smollm2-135m.yaml)")
        if isinstance(options.hparams, (str, Path)):
            self.hparams = AlphaEditHyperParams.from_hparams(str(options.hparams))
        else:
            self.hparams = copy.deepcopy(options.hparams)
        for name, value in options.overrides.items():
            if not hasattr(self.hparams, name):
                raise ValueError(f"AlphaEdit hparams have no field {name!r}")
            setattr(self.hparams, name, value)
        self.state = None

    def _templates(self):
        from ..architectures import templates_for

        return templates_for(self.model, self.hparams)

    def prepare(self):
        from ..alphaedit_main import create_state

        self.state = create_state(self.model, self.tok, self.hparams)

    def edited_parameters(self):
        template = self._templates().rewrite_module_tmp
        return [f"{template.format(layer)}.weight" for layer in self.hparams.layers]

    def edit(self, requests):
        from ..alphaedit_main import apply_alphaedit_to_model

        if self.state is None:
            self.prepare()
        apply_alphaedit_to_model(self.model, self.tok, requests, self.hparams, state=self.state)

    def save_state(self, folder):
        self.state.save(Path(folder) / self.STATE_FILE)

    def load_state(self, folder):
        from ..state import AlphaEditState

        device = next(self.model.parameters()).device
        self.state = AlphaEditState.load(Path(folder) / self.STATE_FILE, device=device)

    def describe(self):
        fields = self.hparams.method_fields() if hasattr(self.hparams, "method_fields") else {}
        return {"hparams": {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
                            for k, v in fields.items()}}


MethodFactory = Callable[[Any, Any, MethodOptions], EditMethod]
_REGISTRY: Dict[str, MethodFactory] = {}


def register_method(name: str, factory: MethodFactory, replace: bool = False) -> None:
    """Make ``name`` available to the runner and the CLI; refuses a name already taken unless ``replace``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable (model, tok, MethodOptions) -> EditMethod")
    if name in _REGISTRY and not replace:
        raise ValueError(f"method {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = factory


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_methods() -> List[str]:
    return sorted(_REGISTRY)


def create_method(name: str, model, tok, options: Optional[MethodOptions] = None) -> EditMethod:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    method = _REGISTRY[name](model, tok, options or MethodOptions())
    method.name = name
    return method


register_method("AlphaEdit", AlphaEditMethod)
register_method("unedited", UneditedMethod)
