"""The sequential state of a MEMIT-family executor, and the preservation statistics C0 it needs.

It wraps an :class:`~alphaedit_plugin.state.AlphaEditState` (projectors, the
running Kp Kpᵀ, context prefixes, held-out keys, edit log, identity checks),
so every variant shares AlphaEdit's statistics cache and its refusal of a
state made for another model, layer set, corpus or threshold. Added here:

- ``second_moments``: C0 = K0K0ᵀ/N per layer (MEMIT's preservation term),
  read from the same cached statistics file the projector was built from;
- ``original_weights`` and ``raw_totals`` (PRUNE): the weights when the state
  was made and the unrestrained sum of every update since.

``save(path)`` writes these to ``path`` and the core, with AlphaEditState's
own ``save``, to ``<stem>.core<suffix>`` beside it; ``load(path, device=...)``
reads both back and, given ``expected_identity``, refuses a state made for
another model, method, layer set, corpus or threshold.
"""

from __future__ import annotations

import copy as copy_module
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .. import cache
from ..alphaedit_main import create_state, state_identity, validate_setup
from ..architectures import ModuleTemplates, get_module, weight_as_out_in
from ..corpus import corpus_identity
from ..nullspace import _compute_statistics, _paths, key_weight_fingerprints, statistics_key
from ..state import AlphaEditState
from .hparams import BaselineHyperParams

logger = logging.getLogger(__name__)

BASELINE_STATE_FORMAT = 1


@dataclass
class BaselineState:
    core: AlphaEditState
    second_moments: Dict[int, torch.Tensor]  # (d_in, d_in) float64, count-normalised
    original_weights: Dict[int, torch.Tensor] = field(default_factory=dict)  # (out, in), PRUNE only
    raw_totals: Dict[int, torch.Tensor] = field(default_factory=dict)  # (out, in) float64, PRUNE only

    @property
    def identity(self) -> Dict[str, Any]:
        return self.core.identity

    def check_compatible(self, identity: Dict[str, Any]) -> None:
        self.core.check_compatible(identity)

    def snapshot(self) -> Dict[str, Any]:
        """The parts one edit changes, to put back if the host undoes that edit."""
        return {"previous_keys_cov": {l: v.clone() for l, v in self.core.previous_keys_cov.items()},
                "raw_totals": {l: v.clone() for l, v in self.raw_totals.items()},
                "edit_log": list(self.core.edit_log)}

    def restore(self, snapshot: Dict[str, Any]) -> None:
        self.core.previous_keys_cov = snapshot["previous_keys_cov"]
        self.raw_totals = snapshot["raw_totals"]
        self.core.edit_log[:] = snapshot["edit_log"]

    def reset(self) -> None:
        """Forget earlier edits (restore the weights yourself)."""
        self.core.reset()
        for total in self.raw_totals.values():
            total.zero_()

    # ------------------------------------------------------------------
    @staticmethod
    def core_path(path: Union[str, Path]) -> Path:
        """Where ``save(path)`` writes the core (``state.pt`` -> ``state.core.pt``)."""
        path = Path(path)
        return path.with_name(f"{path.stem}.core{path.suffix or '.pt'}")

    def save(self, path: Union[str, Path]) -> None:
        """Write the state: the core (projectors, Kp Kpᵀ, prefixes, log) beside ``path``, the rest in it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        core_path = self.core_path(path)
        self.core.save(core_path)

        def cpu(tensors: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {str(layer): tensor.detach().cpu() for layer, tensor in tensors.items()}

        torch.save({"format": BASELINE_STATE_FORMAT, "kind": "BaselineState", "core_file": core_path.name,
                    "identity": self.core.identity, "second_moments": cpu(self.second_moments),
                    "original_weights": cpu(self.original_weights), "raw_totals": cpu(self.raw_totals)}, path)

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
             expected_identity: Optional[Dict[str, Any]] = None) -> "BaselineState":
        """Read what :meth:`save` wrote, onto ``device``; with ``expected_identity`` (``baseline_identity``
        of the model and hparams it is for) a state made for another setting raises StateMismatchError."""
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read baseline editing state {path}: {type(error).__name__}: {error}") from error
        if not isinstance(data, dict) or data.get("kind") != "BaselineState" \
                or data.get("format") != BASELINE_STATE_FORMAT:
            raise ValueError(f"{path} is not a baseline (MEMIT/PRUNE/RECT) state file of format "
                             f"{BASELINE_STATE_FORMAT}")
        core = AlphaEditState.load(path.parent / data["core_file"], device=device)
        if core.identity != data["identity"]:
            raise ValueError(f"{path} and its core file {data['core_file']} belong to different states "
                             f"(identities {data['identity']!r} and {core.identity!r})")

        def tensors(name: str) -> Dict[int, torch.Tensor]:
            return {int(layer): tensor.to(device) for layer, tensor in data[name].items()}

        state = cls(core=core, second_moments=tensors("second_moments"),
                    original_weights=tensors("original_weights"), raw_totals=tensors("raw_totals"))
        if expected_identity is not None:
            state.check_compatible(expected_identity)
        return state


def baseline_identity(model, hparams: BaselineHyperParams, templates: ModuleTemplates) -> Dict[str, Any]:
    """AlphaEdit's identity plus what makes a variant's state its own."""
    return {**state_identity(model, hparams, templates), "method": hparams.label,
            "mom2_update_weight": hparams.mom2_update_weight}


def load_second_moments(model, tok, hparams, templates: ModuleTemplates) -> Dict[int, torch.Tensor]:
    """C0 per layer from AlphaEdit's statistics cache (the file the projector came from); computed if absent."""
    root = cache.cache_root(hparams.stats_dir)
    corpus = corpus_identity(hparams.mom2_dataset, hparams.mom2_max_tokens, hparams.seed)
    fingerprints = key_weight_fingerprints(model, templates, hparams.layers)
    keys = {layer: statistics_key(model, hparams, templates, layer, corpus, fingerprints[layer])
            for layer in hparams.layers}
    moments, missing = {}, {}
    for layer, key in keys.items():
        stored = cache.load_keyed(_paths(root, key), key)
        if stored is None:
            missing[layer] = key
        else:
            moments[layer] = stored["moment"]
    if missing:
        logger.info("statistics for layers %s are not cached; computing them", sorted(missing))
        for layer, stored in _compute_statistics(model, tok, hparams, templates, missing, root).items():
            moments[layer] = stored["moment"]
    return {layer: moments[layer].to(torch.float64) for layer in hparams.layers}


def create_baseline_state(model, tok, hparams: BaselineHyperParams) -> BaselineState:
    """A fresh state: projectors and context prefixes (AlphaEdit's), C0, and PRUNE's reference weights."""
    templates = validate_setup(model, hparams)
    core = create_state(model, tok, hparams)
    core.identity = baseline_identity(model, hparams, templates)
    second_moments = load_second_moments(model, tok, hparams, templates)
    state = BaselineState(core=core, second_moments=second_moments)
    if hparams.alg_name == "PRUNE":
        for layer in hparams.layers:
            weight = weight_as_out_in(get_module(model, templates.rewrite_module_tmp.format(layer))).detach()
            state.original_weights[layer] = weight.clone()
            state.raw_totals[layer] = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    return state


def copy_state(state: BaselineState) -> BaselineState:
    return copy_module.deepcopy(state)
