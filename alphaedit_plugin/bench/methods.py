"""The editing methods the benchmark runner can run, by name.

A method is registered with one call::

    from alphaedit_plugin.bench import register_method
    register_method("MyMethod", lambda model, tok, options: MyMethod(model, tok, options))

The factory gets the model, the tokenizer and :class:`MethodOptions` and
returns an :class:`EditMethod`. The runner restores the parameters named by
``edited_parameters()`` between methods, saves them after every finished
batch together with whatever ``save_state`` writes, and on resume loads both
back (``load_state``) instead of calling ``prepare``.

Registered here: ``AlphaEdit``, ``unedited`` and the baselines ``MEMIT``,
``MEMIT+P``, ``PRUNE``, ``PRUNE+P``, ``RECT``, ``RECT+P`` (one
:class:`BaselineMethod` each, the ``+P`` twins with AlphaEdit's null-space
projection P), and the same six on the EasyEdit host's own target search and
keys, ``MEMIT@easyeditor``, ``MEMIT@easyeditor+P``, ... (``memit_steps:
easyeditor``; they need the ``easyeditor`` package). Hyperparameters come from ``MethodOptions.hparams`` (a yaml
path or an object); :func:`default_hparams_path` names the shipped yaml of a
known model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

HPARAMS_ROOT = Path(__file__).resolve().parents[2] / "hparams"
BASELINE_LABELS = ("MEMIT", "MEMIT+P", "PRUNE", "PRUNE+P", "RECT", "RECT+P")
# The same executors on the EasyEdit host's own compute_z / compute_ks (memit_steps: easyeditor).
HOST_STEP_LABELS = tuple(label.replace("+P", "") + "@easyeditor" + ("+P" if label.endswith("+P") else "")
                         for label in BASELINE_LABELS)
# --model values with shipped yaml files: hparams/<ALG>/<key>.yaml (baselines: <key>[-projected].yaml)
MODEL_KEYS = {"smollm2": "smollm2-135m"}


@dataclass
class MethodOptions:
    hparams: Any = None  # a yaml path or a hyperparameter object (AlphaEdit: AlphaEditHyperParams)
    overrides: Dict[str, Any] = field(default_factory=dict)  # hparams fields to replace
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)  # anything else a method needs


class EditMethod:
    """Base class: a stateful editor bound to one model."""

    name = "method"
    uses_hparams = True  # False: the CLI gives it no --hparams / --method-hparams

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
    uses_hparams = False

    def edit(self, requests):
        return None


class StatefulEditMethod(EditMethod):
    """An editor with hyperparameters and one state carried across batches (AlphaEdit, the baselines).

    Subclasses set ``STATE_FILE`` and write ``prepare`` (make ``self.state``), ``apply`` (edit with it) and
    ``load_state``; the edited parameters, the lazy preparation and the saving are shared.
    """

    STATE_FILE = "state.pt"

    def __init__(self, model, tok, options: MethodOptions, hparams):
        super().__init__(model, tok, options)
        self.hparams = hparams
        self.state = None

    def _device(self):
        return next(self.model.parameters()).device

    def _templates(self):
        from ..architectures import templates_for

        return templates_for(self.model, self.hparams)

    def edited_parameters(self):
        template = self._templates().rewrite_module_tmp
        return [f"{template.format(layer)}.weight" for layer in self.hparams.layers]

    def apply(self, requests) -> None:
        raise NotImplementedError

    def edit(self, requests):
        if self.state is None:
            self.prepare()
        self.apply(requests)

    def save_state(self, folder):
        self.state.save(Path(folder) / self.STATE_FILE)


class AlphaEditMethod(StatefulEditMethod):
    """AlphaEdit with one persistent :class:`~alphaedit_plugin.AlphaEditState` across batches."""

    name = "AlphaEdit"
    STATE_FILE = "alphaedit_state.pt"

    def __init__(self, model, tok, options: MethodOptions):
        super().__init__(model, tok, options, self.check_options(options))

    @classmethod
    def check_options(cls, options: MethodOptions):
        """The hyperparameters ``options`` give (overrides applied); no model needed."""
        from ..hparams import AlphaEditHyperParams

        if options.hparams is None:
            raise ValueError("AlphaEdit needs hyperparameters: pass --hparams PATH or --method-hparams AlphaEdit=PATH "
                             "(e.g. hparams/AlphaEdit/smollm2-135m.yaml)")
        if isinstance(options.hparams, (str, Path)):
            hparams = AlphaEditHyperParams.from_hparams(str(options.hparams))
        else:
            hparams = copy.deepcopy(options.hparams)
        apply_overrides(hparams, options.overrides, "AlphaEdit")
        return hparams

    def prepare(self):
        from ..alphaedit_main import create_state

        self.state = create_state(self.model, self.tok, self.hparams)

    def apply(self, requests):
        from ..alphaedit_main import apply_alphaedit_to_model

        apply_alphaedit_to_model(self.model, self.tok, requests, self.hparams, state=self.state)

    def load_state(self, folder):
        from ..state import AlphaEditState

        self.state = AlphaEditState.load(Path(folder) / self.STATE_FILE, device=self._device())

    def describe(self):
        return {"hparams": describe_hparams(self.hparams)}


def apply_overrides(hparams: Any, overrides: Dict[str, Any], label: str) -> None:
    """Replace hparams fields in place (the CLI's --corpus, --stats-dir, ...); an unknown field is refused."""
    for name, value in overrides.items():
        if not hasattr(hparams, name):
            raise ValueError(f"{label} hparams have no field {name!r}")
        setattr(hparams, name, value)


def describe_hparams(hparams: Any) -> Dict[str, Any]:
    fields = hparams.method_fields() if hasattr(hparams, "method_fields") else {}
    return {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)) for k, v in fields.items()}


def parse_baseline_label(label: str) -> Tuple[str, bool, str]:
    """``"PRUNE+P"`` -> ``("PRUNE", True, "plugin")``; ``"MEMIT@easyeditor"`` -> ``("MEMIT", False, "easyeditor")``."""
    if label not in BASELINE_LABELS + HOST_STEP_LABELS:
        raise ValueError(f"unknown baseline {label!r}; expected one of {', '.join(BASELINE_LABELS + HOST_STEP_LABELS)}")
    name, projected = (label[:-2], True) if label.endswith("+P") else (label, False)
    alg, _, steps = name.partition("@")
    return alg, projected, steps or "plugin"


def yaml_stem(key: str, projected: bool, steps: str) -> str:
    """The shipped yaml's name for a model key: ``smollm2-135m[-easyeditor][-projected]``."""
    return key + ("-easyeditor" if steps == "easyeditor" else "") + ("-projected" if projected else "")


def model_key(model: str) -> Optional[str]:
    """The hparams file key of a --model value (``smollm2`` -> ``smollm2-135m``), or None if none is shipped."""
    name = str(model).lower()
    return next((key for prefix, key in MODEL_KEYS.items() if name.startswith(prefix)), None)


def default_hparams_path(method: str, model: str) -> Optional[Path]:
    """The shipped yaml of ``method`` for ``model`` (AlphaEdit: hparams/AlphaEdit/<key>.yaml; a baseline:
    hparams/<ALG>/<key>[-projected].yaml), or None when there is none."""
    key = model_key(model)
    if key is None:
        return None
    if method == "AlphaEdit":
        path = HPARAMS_ROOT / "AlphaEdit" / f"{key}.yaml"
    elif method in BASELINE_LABELS + HOST_STEP_LABELS:
        alg, projected, steps = parse_baseline_label(method)
        path = HPARAMS_ROOT / alg / f"{yaml_stem(key, projected, steps)}.yaml"
    else:
        return None
    return path if path.is_file() else None


def load_baseline_hparams(label: str, source: Any, overrides: Optional[Dict[str, Any]] = None):
    """The hyperparameters of baseline ``label`` from a yaml path or an object, with ``overrides`` applied.

    Refuses (ValueError) hparams whose ``alg_name`` or ``projection`` do not match the label: ``MEMIT+P``
    needs ``alg_name: MEMIT`` and ``projection: true``, ``MEMIT`` needs ``projection: false``.
    """
    from ..baselines import BaselineHyperParams, load_hparams

    alg, projected, steps = parse_baseline_label(label)
    flag = f"--method-hparams {label}=PATH (e.g. hparams/{alg}/{yaml_stem('smollm2-135m', projected, steps)}.yaml)"
    if source is None:
        raise ValueError(f"{label} needs hyperparameters: pass {flag}, or --hparams PATH when it is the only "
                         "method with hyperparameters")
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            hparams = load_hparams(source)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{label}: {error}; pass {flag}") from error
        except ValueError as error:
            raise ValueError(f"{label}: cannot use {where}: {error}; pass {flag}") from error
    elif isinstance(source, BaselineHyperParams):
        where, hparams = f"the given {type(source).__name__}", copy.deepcopy(source)
    else:
        raise TypeError(f"{label}: hparams must be a yaml path or MEMIT/PRUNE/RECT hyperparameters from "
                        f"alphaedit_plugin.baselines, got {type(source).__module__}.{type(source).__name__}")
    apply_overrides(hparams, overrides or {}, label)
    if hparams.alg_name != alg:
        raise ValueError(f"{label} needs hparams with alg_name: {alg}, but {where} has alg_name: "
                         f"{hparams.alg_name}; pass {flag}")
    if hparams.projection != projected:
        raise ValueError(f"{label} needs hparams with projection: {str(projected).lower()}, but {where} has "
                         f"projection: {str(hparams.projection).lower()} (it is {hparams.label}'s); pass {flag}")
    if hparams.memit_steps != steps:
        raise ValueError(f"{label} needs hparams with memit_steps: {steps}, but {where} has memit_steps: "
                         f"{hparams.memit_steps} (it is {hparams.label}'s); pass {flag}")
    hparams.validate()
    return hparams


class BaselineMethod(StatefulEditMethod):
    """MEMIT, PRUNE or RECT, with (``+P``) or without the null-space projection P, by label.

    One :class:`~alphaedit_plugin.baselines.BaselineState` is kept across batches (projectors, Kp Kpᵀ,
    C0, PRUNE's running totals) and saved with every checkpoint.
    """

    STATE_FILE = "baseline_state.pt"

    def __init__(self, model, tok, options: MethodOptions, label: str = "MEMIT"):
        super().__init__(model, tok, options, load_baseline_hparams(label, options.hparams, options.overrides))
        self.label = label
        self.name = label

    def _identity(self):
        from ..baselines.state import baseline_identity

        return baseline_identity(self.model, self.hparams, self._templates())

    def prepare(self):
        from ..baselines import create_baseline_state

        state = create_baseline_state(self.model, self.tok, self.hparams)
        device = self._device()  # C0 comes from the (cpu) statistics cache; keep the whole state with the model
        state.second_moments = {layer: moment.to(device) for layer, moment in state.second_moments.items()}
        self.state = state

    def apply(self, requests):
        from ..baselines import apply_baseline_to_model

        apply_baseline_to_model(self.model, self.tok, requests, self.hparams, state=self.state)

    def load_state(self, folder):
        from ..baselines import BaselineState

        self.state = BaselineState.load(Path(folder) / self.STATE_FILE, device=self._device(),
                                        expected_identity=self._identity())

    def describe(self):
        return {"label": self.label, "variant": self.hparams.label, "hparams": describe_hparams(self.hparams)}


def _baseline_factory(label: str) -> "MethodFactory":
    def factory(model, tok, options: MethodOptions) -> BaselineMethod:
        return BaselineMethod(model, tok, options, label=label)

    factory.uses_hparams = True
    factory.check_options = lambda options: load_baseline_hparams(label, options.hparams, options.overrides)
    factory.__qualname__ = f"BaselineMethod[{label}]"
    return factory


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


def method_uses_hparams(name: str) -> bool:
    """Whether method ``name`` takes hyperparameters (its factory's ``uses_hparams``; True unless it says not)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    return bool(getattr(_REGISTRY[name], "uses_hparams", True))


def check_method_options(name: str, options: Optional[MethodOptions] = None) -> None:
    """Check a method's options (hyperparameters) without a model, where its factory has ``check_options``:
    bad settings then fail before a slow model load. Raises what the method's constructor would."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    check = getattr(_REGISTRY[name], "check_options", None)
    if check is not None:
        check(options or MethodOptions())


def create_method(name: str, model, tok, options: Optional[MethodOptions] = None) -> EditMethod:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    method = _REGISTRY[name](model, tok, options or MethodOptions())
    method.name = name
    return method


register_method("AlphaEdit", AlphaEditMethod)
register_method("unedited", UneditedMethod)
for _label in BASELINE_LABELS + HOST_STEP_LABELS:
    register_method(_label, _baseline_factory(_label))
