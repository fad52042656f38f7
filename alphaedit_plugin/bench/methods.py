"""What the benchmark runner runs, by label: every registered method and variant, and ``unedited``.

The labels come from :mod:`alphaedit_plugin.registry` (``AlphaEdit``,
``MEMIT``, ``MEMIT+P``, ``MEMIT@easyeditor+P``, ``PRUNE``, ...); a method
registered there is in ``alphaedit-bench --methods`` at once. ``unedited`` is
the runner's own row: the unedited model scored like the others.
``AlphaEdit@host`` is the current EasyEdit's own AlphaEdit
(:mod:`alphaedit_plugin.hosts.easyedit.host_alphaedit`), with AlphaEdit's
hyperparameters: the plugin and the host side by side in one run;
``SPHERE@host`` the host's SPHERE with SPHERE's.

Each label runs as a :class:`RegisteredMethodRun`: its hyperparameters come
from ``MethodOptions.hparams`` (a yaml path or an object), else from the
shipped yaml of the model (:func:`default_hparams_path`), and must be the
label's (its method and variant settings). One editing state is kept across
batches and saved with every checkpoint. The runner restores the parameters
named by ``edited_parameters()`` between methods, saves them after every
finished batch together with the state, and on resume loads both back
instead of calling ``prepare``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import registry

logger = logging.getLogger(__name__)

UNEDITED = "unedited"
HOST_ALPHAEDIT = "AlphaEdit@host"
HOST_SPHERE = "SPHERE@host"
HPARAMS_LABEL = {HOST_ALPHAEDIT: "AlphaEdit", HOST_SPHERE: "SPHERE"}  # the registered method whose yaml a row takes
HOST_LABELS = tuple(HPARAMS_LABEL)  # the rows that run the host's own code (HostAlphaEditRun)


@dataclass
class MethodOptions:
    hparams: Any = None  # a yaml path or a hyperparameter object
    overrides: Dict[str, Any] = field(default_factory=dict)  # hparams fields to replace
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)  # anything else a method needs


class BenchMethod:
    """Base class: one row of the benchmark, bound to one model."""

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
        """Read back what ``save_state`` wrote; the model is still unedited (its weights come after)."""

    def describe(self) -> Dict[str, Any]:
        """Settings recorded in the results."""
        return {}

    def preservation(self, originals: Dict[str, Any]) -> Optional[Dict[str, float]]:
        """‖ΔW·K0‖/‖W·K0‖ per edited layer of everything written since ``originals`` (the parameters before the
        first batch), on held-out corpus keys; None where the method has no such keys."""
        return None

    def capacity(self) -> Optional[Dict[str, Dict[str, int]]]:
        """Per edited layer, the null space's dimension and how much of it the edits so far occupy and leave
        (:func:`..null_space_capacity.null_space_occupancy`); None where the method has no null space."""
        return None


class UneditedMethod(BenchMethod):
    """Makes no edit: the baseline row (the unedited model scored like the others)."""

    name = UNEDITED
    uses_hparams = False

    def edit(self, requests):
        return None


class RegisteredMethodRun(BenchMethod):
    """A registered method (or variant) with one :class:`~alphaedit_plugin.state.EditingState` across batches."""

    STATE_FILE = "state.pt"

    def __init__(self, model, tok, options: MethodOptions, label: str):
        super().__init__(model, tok, options)
        self.label = self.name = label
        self.hparams = load_method_hparams(label, options.hparams, options.overrides)
        self.state = None

    def _templates(self):
        from ..architectures import templates_for

        return templates_for(self.model, self.hparams)

    def edited_parameters(self):
        template = self._templates().rewrite_module_tmp
        return [f"{template.format(layer)}.weight" for layer in self.hparams.layers]

    def prepare(self):
        from ..edit_loop import create_state

        # Its keys kept, so that the resume file holds them instead of Kp Kpᵀ while they are the smaller.
        self.state = create_state(self.model, self.tok, self.hparams).keep_earlier_keys()

    def edit(self, requests):
        from ..edit_loop import apply_to_model

        if self.state is None:
            self.prepare()
        apply_to_model(self.model, self.tok, requests, self.hparams, state=self.state)

    def save_state(self, folder):
        # What the edits added only: P, C0 and the rest come back from the statistics cache (or are computed
        # again) on resume, so that a long run's resume folder is small enough to keep (in git, for one).
        self.state.save(Path(folder) / self.STATE_FILE, accumulated_only=True)

    def load_state(self, folder):
        """Called on the unedited model (the runner loads the checkpoint's weights afterwards)."""
        from ..edit_loop import create_state

        self.state = create_state(self.model, self.tok, self.hparams).resume(Path(folder) / self.STATE_FILE)

    def describe(self):
        return {"label": self.label, "variant": self.hparams.label, "hparams": describe_hparams(self.hparams)}

    def preservation(self, originals):
        from ..architectures import get_module, is_transposed, weight_as_out_in
        from ..constrained_solve import preservation_ratio

        template = self._templates().rewrite_module_tmp
        result = {}
        for layer in self.hparams.layers:
            keys = self.state.null_spaces[layer].heldout_keys
            if keys is None:
                continue
            module = get_module(self.model, template.format(layer))
            original = originals[f"{template.format(layer)}.weight"]
            original = original.T if is_transposed(module) else original
            now = weight_as_out_in(module).detach()
            result[str(layer)] = preservation_ratio(now - original, original, keys.to(original.device))
        return result or None

    def capacity(self):
        from ..null_space_capacity import null_space_occupancy

        terms = registry.method_for(self.hparams).solve_terms()
        if not (terms.projection and terms.earlier_keys) or self.state is None:
            return None
        tolerance = terms.ridge if terms.ridge > 0 else 1.0
        return {str(layer): null_space_occupancy(self.state.null_spaces[layer].projector,
                                                 self.state.earlier_keys_kkt_sum[layer],
                                                 self.state.null_spaces[layer].rank, tolerance)
                for layer in self.state.layers}


class HostAlphaEditRun(BenchMethod):
    """The host's ``apply_AlphaEdit_to_model`` (or ``apply_SPHERE_to_model``), unchanged, on the hyperparameters of
    the plugin's method of that name (see :mod:`alphaedit_plugin.hosts.easyedit.host_alphaedit`); its P and key
    cache are the state between batches."""

    STATE_FILE = "host_state.pt"

    def __init__(self, model, tok, options: MethodOptions, label: str = HOST_ALPHAEDIT):
        from ..architectures import templates_for
        from ..hosts.easyedit.host_alphaedit import HOST_ALPHAEDIT_CODE, HOST_SPHERE_CODE, HostAlphaEdit

        super().__init__(model, tok, options)
        self.name = label
        code = {HOST_ALPHAEDIT: HOST_ALPHAEDIT_CODE, HOST_SPHERE: HOST_SPHERE_CODE}[label]
        self.hparams = load_method_hparams(label, options.hparams, options.overrides)
        self.templates = templates_for(model, self.hparams)
        self.host = HostAlphaEdit(model, tok, self.hparams, self.templates, code=code)

    def edited_parameters(self):
        return [f"{self.templates.rewrite_module_tmp.format(layer)}.weight" for layer in self.hparams.layers]

    def prepare(self):
        """The host's statistics and projectors, over the texts the plugin's statistics read (the held-out
        share left out as there)."""
        from ..layer_statistics import statistics_texts

        kept, _ = statistics_texts(self.model, self.tok, self.hparams)
        self.host.compute_projectors(kept)

    def edit(self, requests):
        self.host.edit(requests)

    def save_state(self, folder):
        import torch

        torch.save(self.host.state(), Path(folder) / self.STATE_FILE)

    def load_state(self, folder):
        import torch

        self.host.load_state(torch.load(Path(folder) / self.STATE_FILE, weights_only=True))

    def describe(self):
        host = describe_hparams_object(self.host.host_hparams)
        for scratch_path in ("stats_dir", "P_loc"):  # new in every process: not a setting
            host.pop(scratch_path, None)
        code = self.host.code
        return {"label": self.name, "code": f"{code.main_module}.{code.apply_function}",
                "hparams": describe_hparams(self.hparams), "host_hparams": host}


# ---------------------------------------------------------------------------
def apply_overrides(hparams: Any, overrides: Dict[str, Any], label: str) -> None:
    """Replace hparams fields in place (the CLI's --corpus, --stats-dir, ...); an unknown field is refused."""
    for name, value in overrides.items():
        if not hasattr(hparams, name):
            raise ValueError(f"{label} hparams have no field {name!r}")
        setattr(hparams, name, value)


def _as_json_values(fields: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)) for k, v in fields.items()}


def describe_hparams(hparams: Any) -> Dict[str, Any]:
    return _as_json_values(hparams.method_fields() if hasattr(hparams, "method_fields") else {})


def describe_hparams_object(hparams: Any) -> Dict[str, Any]:
    """Every dataclass field of a (host) hyperparameter object, as JSON values."""
    import dataclasses

    return _as_json_values({f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams)})


def default_hparams_path(label: str, model: str) -> Optional[Path]:
    """The shipped yaml of ``label`` for ``model`` (``hparams/<method>/<key><variant suffix>.yaml``), or None."""
    label = HPARAMS_LABEL.get(label, label)
    if label == UNEDITED or label not in registry.labels():
        return None
    return registry.shipped_hparams_path(label, model)


def load_method_hparams(label: str, source: Any, overrides: Optional[Dict[str, Any]] = None):
    """The hyperparameters of ``label`` from a yaml path or an object, with ``overrides`` applied.

    Refuses (ValueError) hparams of another method or variant: ``MEMIT+P`` needs ``alg_name: MEMIT`` and
    ``projection: true``, ``MEMIT`` needs ``projection: false``.
    """
    row, label = label, HPARAMS_LABEL.get(label, label)
    entry, _ = registry.parse_label(label)
    shipped = registry.yaml_name(label, "smollm2-135m")
    flag = f"--method-hparams {row}=PATH (e.g. {shipped})"
    if source is None:
        raise ValueError(f"{label} needs hyperparameters: pass {flag}, or --hparams PATH when it is the only "
                         "method with hyperparameters")
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            hparams = registry.load_hparams(source)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{label}: {error}; pass {flag}") from error
        except ValueError as error:
            raise ValueError(f"{label}: cannot use {where}: {error}; pass {flag}") from error
    elif isinstance(source, entry.hparams_class):
        where, hparams = f"the given {type(source).__name__}", copy.deepcopy(source)
    else:
        raise TypeError(f"{label}: hparams must be a yaml path or {entry.hparams_class.__name__}, got "
                        f"{type(source).__module__}.{type(source).__name__}")
    apply_overrides(hparams, overrides or {}, label)
    registry.check_variant(label, hparams, where, hint=f"; pass {flag}")
    hparams.validate()
    return hparams


# ---------------------------------------------------------------------------
def available_methods() -> List[str]:
    return [UNEDITED] + registry.labels() + list(HOST_LABELS)


def method_uses_hparams(name: str) -> bool:
    """Whether method ``name`` takes hyperparameters (every registered method does; ``unedited`` does not)."""
    if name not in available_methods():
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    return name != UNEDITED


def check_method_options(name: str, options: Optional[MethodOptions] = None) -> None:
    """Check a method's hyperparameters without a model: bad settings then fail before a slow model load."""
    if name not in available_methods():
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    if name != UNEDITED:
        options = options or MethodOptions()
        load_method_hparams(name, options.hparams, options.overrides)


def create_method(name: str, model, tok, options: Optional[MethodOptions] = None) -> BenchMethod:
    options = options or MethodOptions()
    if name == UNEDITED:
        return UneditedMethod(model, tok, options)
    if name in HOST_LABELS:
        return HostAlphaEditRun(model, tok, options, label=name)
    if name not in registry.labels():
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_methods())}")
    return RegisteredMethodRun(model, tok, options, label=name)
