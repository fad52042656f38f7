"""The sequential-editing state: what AlphaEdit carries from one edit to the next.

Holds, per edited layer, the null-space projector P, the running sum of
earlier edits' key products Kp Kpᵀ and a held-out key sample for the
preservation figure; the context prefixes; and an edit log. No module-level
globals: a user (or the EasyEdit adapter) owns one state per model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

from .nullspace import LayerNullSpace

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


class StateMismatchError(ValueError):
    pass


@dataclass
class EditRecord:
    """One batch of edits applied together."""

    requests: List[Dict[str, Any]]
    update_norms: Dict[int, float]  # ‖Δ‖_F per layer
    preservation: Dict[int, float]  # ‖Δ K0‖ / ‖W K0‖ per layer on held-out corpus keys
    target_probability: List[float]  # per request, at the end of the target search
    seconds: float


@dataclass
class AlphaEditState:
    identity: Dict[str, Any]
    null_spaces: Dict[int, LayerNullSpace]
    context_templates: List[List[str]]
    previous_keys_cov: Dict[int, torch.Tensor] = field(default_factory=dict)
    edit_log: List[EditRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        for layer, space in self.null_spaces.items():
            if layer not in self.previous_keys_cov:
                d_in = space.projector.shape[0]
                self.previous_keys_cov[layer] = torch.zeros(d_in, d_in, dtype=torch.float32,
                                                            device=space.projector.device)

    # ------------------------------------------------------------------
    @property
    def layers(self) -> List[int]:
        return sorted(self.null_spaces)

    @property
    def edits_applied(self) -> int:
        return sum(len(record.requests) for record in self.edit_log)

    def to(self, device: Union[str, torch.device]) -> "AlphaEditState":
        for space in self.null_spaces.values():
            space.projector = space.projector.to(device)
        self.previous_keys_cov = {k: v.to(device) for k, v in self.previous_keys_cov.items()}
        return self

    def reset(self) -> None:
        """Forget earlier edits (Kp Kpᵀ and the log); projectors and prefixes stay.

        Use it together with restoring the model's original weights.
        """
        for cov in self.previous_keys_cov.values():
            cov.zero_()
        self.edit_log.clear()

    def check_compatible(self, identity: Dict[str, Any]) -> None:
        """Refuse a state made for another model, layers, corpus or threshold."""
        differing = sorted(k for k in set(self.identity) | set(identity)
                           if k != "weights_sha256" and self.identity.get(k) != identity.get(k))
        if differing:
            details = "; ".join(f"{k}: state has {self.identity.get(k)!r}, edit needs {identity.get(k)!r}"
                                for k in differing)
            raise StateMismatchError(f"the editing state was made for a different setting ({details}); "
                                     "create a new state or reset the model")

    # ------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "format": STATE_FORMAT,
            "identity": self.identity,
            "context_templates": self.context_templates,
            "null_spaces": {str(l): {"projector": s.projector.cpu(), "rank": s.rank,
                                     "heldout_keys": s.heldout_keys, "token_count": s.token_count}
                            for l, s in self.null_spaces.items()},
            "previous_keys_cov": {str(l): v.cpu() for l, v in self.previous_keys_cov.items()},
            "edit_log": [{**asdict(r), "update_norms": {str(k): v for k, v in r.update_norms.items()},
                          "preservation": {str(k): v for k, v in r.preservation.items()}} for r in self.edit_log],
        }, path)

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "AlphaEditState":
        try:
            data = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read editing state {path}: {type(error).__name__}: {error}") from error
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not an AlphaEdit state file of format {STATE_FORMAT}")
        state = cls(
            identity=data["identity"],
            null_spaces={int(l): LayerNullSpace(**s) for l, s in data["null_spaces"].items()},
            context_templates=data["context_templates"],
            previous_keys_cov={int(l): v for l, v in data["previous_keys_cov"].items()},
            edit_log=[EditRecord(**{**r, "update_norms": {int(k): v for k, v in r["update_norms"].items()},
                                    "preservation": {int(k): v for k, v in r["preservation"].items()}})
                      for r in data["edit_log"]],
        )
        return state.to(device)
