"""The editing state: what every method carries from one edit to the next, and the only thing that changes it.

One :class:`EditingState` per model and setting (method, layers, corpus,
threshold, ...) holds, per edited layer:

- the null-space projector P and a held-out key sample for the preservation
  figure ‖ΔW·K0‖/‖W·K0‖ (``null_spaces``);
- ``earlier_keys_kkt_sum``: Σ k kᵀ over every key of the edits committed so
  far, unnormalised (the paper's Kp Kpᵀ);
- ``second_moments``: C0 = K0K0ᵀ/N, for methods whose solve has MEMIT's λ·C0
  prior (empty otherwise);
- ``reference_tensors`` and ``running_sums``: what a method keeps besides
  (PRUNE: the original weights and the unrestrained sum of its updates);

plus the context prefixes and the edit log. No module-level globals: a user
(or the EasyEdit adapter) owns one state per model. Only :meth:`commit`,
:meth:`undo_last` and :meth:`reset` change what edits leave behind.

One file format for every method (:meth:`save`/:meth:`load`, format 3: Kp Kpᵀ
in its smallest exact form, :mod:`.key_sum_file`); format-2 files, which hold
it whole, and format-1 files (``AlphaEditState.save`` and
``BaselineState.save`` of earlier versions) still load.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from .errors import ProjectorMismatchError, StateMismatchError
from .key_sum_file import KeyBatches, add_key_products, key_operand, pack_key_sum, unpack_key_sum
from .layer_statistics import LayerNullSpace
from .null_space_projector import ProjectorTensor, projector_file_entry, projector_from_file_entry

logger = logging.getLogger(__name__)

STATE_FORMAT = 3
READABLE_FORMATS = (2, 3)  # format 2 holds Kp Kpᵀ whole
LEGACY_FORMAT = 1
_KIND = "EditingState"


@dataclass
class EditRecord:
    """One batch of edits applied together."""

    requests: List[Dict[str, Any]]
    update_norms: Dict[int, float]  # ‖Δ‖_F per layer
    preservation: Dict[int, float]  # ‖Δ K0‖ / ‖W K0‖ per layer on held-out corpus keys
    target_probability: List[float]  # per request, at the end of the target search
    seconds: float
    achieved_probability: List[float] = field(default_factory=list)  # per request, on its prompt after writing
    not_taken: List[Dict[str, Any]] = field(default_factory=list)  # the requests whose edit did not take, and why


@dataclass
class _Undo:
    """What the last commit replaced: the tensors as they were, and the log length."""

    earlier_keys_kkt_sum: Dict[int, torch.Tensor]
    running_sums: Dict[str, Dict[int, torch.Tensor]]
    log_length: int
    kept_keys: Optional[Dict[int, KeyBatches]]


TensorsByLayer = Dict[int, torch.Tensor]


@dataclass
class EditingState:
    identity: Dict[str, Any]
    null_spaces: Dict[int, LayerNullSpace]
    context_templates: List[List[str]]
    earlier_keys_kkt_sum: TensorsByLayer = field(default_factory=dict)
    second_moments: TensorsByLayer = field(default_factory=dict)  # (d_in, d_in) float64, count-normalised
    reference_tensors: Dict[str, TensorsByLayer] = field(default_factory=dict)
    running_sums: Dict[str, TensorsByLayer] = field(default_factory=dict)
    edit_log: List[EditRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        for layer, space in self.null_spaces.items():
            if layer not in self.earlier_keys_kkt_sum:
                d_in = space.projector.shape[0]
                self.earlier_keys_kkt_sum[layer] = torch.zeros(d_in, d_in, dtype=torch.float32,
                                                               device=space.projector.device)
        self._undo: Optional[_Undo] = None
        # The keys of every commit, on the CPU, where asked (keep_earlier_keys) and while fewer than d_in/2 per
        # layer: the file form of Kp Kpᵀ they allow is then its smallest. None otherwise.
        self._kept_keys: Optional[Dict[int, KeyBatches]] = None

    # ------------------------------------------------------------------
    @property
    def layers(self) -> List[int]:
        return sorted(self.null_spaces)

    @property
    def edits_applied(self) -> int:
        return sum(len(record.requests) for record in self.edit_log)

    @property
    def method(self) -> Optional[str]:
        """The label of the method this state was made for (e.g. ``AlphaEdit``, ``PRUNE+P``)."""
        return self.identity.get("method")

    @property
    def previous_keys_cov(self) -> TensorsByLayer:
        """Deprecated name of :attr:`earlier_keys_kkt_sum` (it is a sum, not a covariance)."""
        return self.earlier_keys_kkt_sum

    def keep_earlier_keys(self) -> "EditingState":
        """Keep each commit's keys (a CPU copy), so that :meth:`save` writes them in place of Kp Kpᵀ while there
        are fewer than d_in/2 of them per layer: a resume file of n·d_in numbers per layer instead of d_in²/2.
        Past d_in/2 they are let go (the upper triangle is then the smaller): at most half the size of Kp Kpᵀ
        in CPU memory (411 MB per layer for d_in = 14,336). Only a state without edits can start (one with
        edits does not know their keys); returns ``self``."""
        if self._kept_keys is None and not self.edit_log:
            self._kept_keys = {layer: [] for layer in self.earlier_keys_kkt_sum}
        return self

    def projector_for(self, layer: int, d_in: int) -> ProjectorTensor:
        """P of ``layer``, checked against the number of inputs of the weight it will be applied to."""
        space = self.null_spaces.get(layer)
        if space is None:
            raise ProjectorMismatchError(f"the editing state has no projector for layer {layer} "
                                         f"(it has layers {sorted(self.null_spaces)})")
        if tuple(space.projector.shape) != (d_in, d_in):
            raise ProjectorMismatchError(f"the projector of layer {layer} is {tuple(space.projector.shape)} but the "
                                         f"edited weight has {d_in} inputs: it was made for another model or module")
        return space.projector

    def to(self, device: Union[str, torch.device]) -> "EditingState":
        for space in self.null_spaces.values():
            space.projector = space.projector.to(device)
        self.earlier_keys_kkt_sum = {k: v.to(device) for k, v in self.earlier_keys_kkt_sum.items()}
        self.second_moments = {k: v.to(device) for k, v in self.second_moments.items()}
        self.reference_tensors = {name: {k: v.to(device) for k, v in group.items()}
                                  for name, group in self.reference_tensors.items()}
        self.running_sums = {name: {k: v.to(device) for k, v in group.items()}
                             for name, group in self.running_sums.items()}
        self._undo = None
        return self

    # ---- the only changes edits make ------------------------------------
    def commit(self, keys: Mapping[int, torch.Tensor], record: EditRecord,
               running_sums: Optional[Mapping[str, Mapping[int, torch.Tensor]]] = None) -> None:
        """Record one written edit: add its keys' K Kᵀ (keys as rows, (n, d_in)), replace the method's running
        sums with ``running_sums``, append ``record``. Undone exactly by :meth:`undo_last`.

        The new tensors are computed before anything is replaced, and the replacement is by assignment,
        so an interruption leaves the state either as it was or as committed.
        """
        unknown = sorted(set(keys) - set(self.earlier_keys_kkt_sum))
        if unknown:
            raise StateMismatchError(f"keys for layers {unknown}, which this state does not edit ({self.layers})")
        new_sums = dict(self.earlier_keys_kkt_sum)
        added = {}
        for layer, layer_keys in keys.items():
            old = self.earlier_keys_kkt_sum[layer]
            added[layer] = layer_keys = key_operand(layer_keys, old)
            new_sums[layer] = add_key_products(old, layer_keys)
        kept = self._kept_keys
        if kept is not None:
            kept = {layer: batches + ([added[layer].detach().to("cpu", copy=True)] if layer in added else [])
                    for layer, batches in kept.items()}
            if any(2 * sum(k.shape[0] for k in batches) >= new_sums[layer].shape[0] for layer, batches in kept.items()):
                kept = None
        new_running = {name: {**self.running_sums.get(name, {}), **dict(values)}
                       for name, values in (running_sums or {}).items()}
        undo = _Undo(earlier_keys_kkt_sum=self.earlier_keys_kkt_sum,
                     running_sums={name: self.running_sums[name] for name in new_running if name in self.running_sums},
                     log_length=len(self.edit_log), kept_keys=self._kept_keys)
        # One C-level update: an interrupt (checked between bytecodes) finds all five old or all five new.
        self.__dict__.update(earlier_keys_kkt_sum=new_sums, running_sums={**self.running_sums, **new_running},
                             edit_log=self.edit_log + [record], _kept_keys=kept, _undo=undo)

    def undo_last(self) -> bool:
        """Take the last committed edit out again (its keys, running sums and log entry), exactly.

        One level: True if there was a commit to undo (none after a load, a reset or an earlier undo).
        """
        undo = self._undo
        if undo is None:
            return False
        self.__dict__.update(earlier_keys_kkt_sum=undo.earlier_keys_kkt_sum,
                             running_sums={**self.running_sums, **undo.running_sums},
                             edit_log=self.edit_log[:undo.log_length], _kept_keys=undo.kept_keys, _undo=None)
        return True

    def reset(self) -> None:
        """Forget earlier edits (Σ k kᵀ, running sums and the log); projectors, C0 and prefixes stay.

        Use it together with restoring the model's original weights.
        """
        self.earlier_keys_kkt_sum = {k: torch.zeros_like(v) for k, v in self.earlier_keys_kkt_sum.items()}
        self.running_sums = {name: {k: torch.zeros_like(v) for k, v in group.items()}
                             for name, group in self.running_sums.items()}
        self.edit_log = []
        self._undo = None
        if self._kept_keys is not None:
            self._kept_keys = {layer: [] for layer in self._kept_keys}

    def check_compatible(self, identity: Dict[str, Any]) -> None:
        """Refuse a state made for another method, model (by its weights, not only its name), layers, corpus or
        threshold. A state from a file of the earlier format, which recorded no weights, is checked without."""
        ignored = {"weights_sha256"}
        if "unedited_weights" not in self.identity:
            ignored.add("unedited_weights")
            if not self.__dict__.get("_said_no_weights"):  # once per state, not at every edit
                self._said_no_weights = True
                logger.warning("the editing state records no fingerprint of the model's weights (an earlier file "
                               "format): it is checked by the model's name only")
        _check_identity(self.identity, identity, ignored)

    # ------------------------------------------------------------------
    def save(self, path: Union[str, Path], accumulated_only: bool = False) -> None:
        """Write the state to ``path``. ``accumulated_only``: only what the edits have added (Kp Kpᵀ, the running
        sums, the edit log) with the identity and the context prefixes, not what :func:`create_state` makes
        again from the unedited model and the statistics cache (P, held-out keys, C0, the unedited weights a
        method keeps): a resume file a fraction of the size, read back with :meth:`resume`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def cpu(tensors: TensorsByLayer) -> Dict[str, torch.Tensor]:
            return {str(layer): tensor.detach().cpu() for layer, tensor in tensors.items()}

        made_again = {} if accumulated_only else {
            "null_spaces": {str(l): {"projector": projector_file_entry(s.projector), "rank": s.rank,
                                     "heldout_keys": s.heldout_keys, "token_count": s.token_count}
                            for l, s in self.null_spaces.items()},
            "second_moments": cpu(self.second_moments),
            "reference_tensors": {name: cpu(group) for name, group in self.reference_tensors.items()},
        }
        torch.save({
            "format": STATE_FORMAT,
            "kind": _KIND,
            "accumulated_only": accumulated_only,
            "identity": self.identity,
            "context_templates": self.context_templates,
            **made_again,
            "earlier_keys_kkt_sum": {str(layer): pack_key_sum(total, (self._kept_keys or {}).get(layer))
                                     for layer, total in self.earlier_keys_kkt_sum.items()},
            "running_sums": {name: cpu(group) for name, group in self.running_sums.items()},
            "edit_log": [_record_to_file(r) for r in self.edit_log],
        }, path)

    def resume(self, path: Union[str, Path]) -> "EditingState":
        """Take over the edits of a state saved with ``accumulated_only`` (or in full) into this fresh state,
        made by :func:`create_state` for the same setting from the unedited model; returns ``self``.

        Refused (:class:`StateMismatchError`), leaving this state as it was, where the file was made for another
        setting or with other context prefixes, or where this state has edits already.
        """
        path = Path(path)
        data = _read(path)
        if not (isinstance(data, dict) and data.get("format") in READABLE_FORMATS and data.get("kind") == _KIND):
            raise ValueError(f"{path} is not an editing state file of format {STATE_FORMAT} (or 2)")
        _require(data, ("identity", "context_templates", "earlier_keys_kkt_sum", "edit_log"), str(path))
        if self.edit_log:
            raise StateMismatchError(f"resume({path}) needs a fresh state; this one has {self.edits_applied} edits")
        _check_identity(data["identity"], self.identity)
        if data["context_templates"] != self.context_templates:
            raise StateMismatchError(f"{path} was edited with other context prefixes than this state's (another "
                                     "seed, count or length, or another model's samples)")
        device = {l: t.device for l, t in self.earlier_keys_kkt_sum.items()}
        sums, kept = _key_sums(data["earlier_keys_kkt_sum"], str(path), device)
        if set(sums) != set(self.earlier_keys_kkt_sum) or any(
                sums[l].shape != self.earlier_keys_kkt_sum[l].shape for l in sums):
            raise StateMismatchError(f"{path} holds key sums of layers {sorted(sums)} that do not fit this state's")
        saved = {name: {l: t.to(device.get(l, t.device)) for l, t in _by_layer(group).items()}
                 for name, group in data.get("running_sums", {}).items()}
        log = [_record_from_file(r) for r in data["edit_log"]]
        # Everything read and checked: one assignment, as in commit.
        self.__dict__.update(earlier_keys_kkt_sum=sums, running_sums={**self.running_sums, **saved}, edit_log=log,
                             _kept_keys=kept, _undo=None)
        return self

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
             expected_identity: Optional[Dict[str, Any]] = None) -> "EditingState":
        """Read what :meth:`save` wrote (or a format-1 file), onto ``device``; with ``expected_identity`` a state
        made for another setting raises :class:`StateMismatchError`."""
        path = Path(path)
        data = _read(path)
        version = data.get("format") if isinstance(data, dict) else None
        if version in READABLE_FORMATS and data.get("kind") == _KIND and data.get("accumulated_only"):
            raise ValueError(f"{path} holds only what the edits added (saved with accumulated_only): make the "
                             "state again with create_state(model, tok, hparams) on the unedited model, then "
                             f"state.resume({str(path)!r})")
        if version in READABLE_FORMATS and data.get("kind") == _KIND:
            state = _from_format_3(data, str(path), device)
        elif version == LEGACY_FORMAT and data.get("kind") == "BaselineState":
            state = _from_legacy_baseline(path, data)
        elif version == LEGACY_FORMAT and "null_spaces" in data:
            state = _from_legacy_alphaedit(data)
        else:
            found = f"format {version!r}" if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path} is not an editing state file of format {STATE_FORMAT} (or the earlier "
                             f"formats 2 and {LEGACY_FORMAT}); it holds {found}")
        state = state.to(device)
        if expected_identity is not None:
            state.check_compatible(expected_identity)
        return state


def _check_identity(have: Dict[str, Any], need: Dict[str, Any], ignored=frozenset({"weights_sha256"})) -> None:
    """Refuse (:class:`StateMismatchError`) a state identity ``have`` where ``need`` differs, naming each entry."""
    differing = sorted(k for k in set(have) | set(need) if k not in ignored and have.get(k) != need.get(k))
    if differing:
        details = "; ".join(f"{k}: state has {have.get(k)!r}, edit needs {need.get(k)!r}" for k in differing)
        hint = (" (the same model name with other weights: another checkpoint, or a state of another model)"
                if differing == ["unedited_weights"] else "")
        raise StateMismatchError(f"the editing state was made for a different setting ({details}){hint}; "
                                 "create a new state or reset the model")


def _record_to_file(record: EditRecord) -> dict:
    return {**asdict(record), "update_norms": {str(k): v for k, v in record.update_norms.items()},
            "preservation": {str(k): v for k, v in record.preservation.items()}}


def _record_from_file(data: dict) -> EditRecord:
    return EditRecord(**{**data, "update_norms": {int(k): v for k, v in data["update_norms"].items()},
                         "preservation": {int(k): v for k, v in data["preservation"].items()}})


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read editing state {path}: {type(error).__name__}: {error}") from error


def _by_layer(tensors: Mapping[str, torch.Tensor]) -> TensorsByLayer:
    return {int(layer): tensor for layer, tensor in tensors.items()}


def _null_spaces(data: Mapping[str, Mapping[str, Any]]) -> Dict[int, LayerNullSpace]:
    return {int(l): LayerNullSpace(**{**s, "projector": projector_from_file_entry(s["projector"])})
            for l, s in data.items()}


def _require(data: Mapping[str, Any], names, path_or_kind: str) -> None:
    missing = [name for name in names if name not in data]
    if missing:
        raise ValueError(f"editing state {path_or_kind} has no entry {missing}; the file is incomplete")


def _key_sums(entries: Mapping[str, Any], where: str, device: Mapping[int, Any], default_device: Any = "cpu"):
    """Kp Kpᵀ per layer from a file's entries (:func:`~.key_sum_file.unpack_key_sum`), each on ``device[layer]``
    (``default_device`` for a layer not there: saved keys are summed again where the sum will be used), and the
    kept keys where the file has them for every layer."""
    sums, kept, exact = {}, {}, True
    for name, entry in entries.items():
        layer = int(name)
        sums[layer], batches, same = unpack_key_sum(entry, f"{where}, layer {layer}",
                                                    device.get(layer, default_device))
        exact = exact and same
        if batches is not None:
            kept[layer] = batches
    if not exact:
        logger.warning("%s: Kp Kpᵀ summed again from the saved keys differs in its last bits from the saved sum "
                       "(another device or BLAS library): the edits go on from it, no longer bit for bit those of "
                       "an uninterrupted run", where)
    return sums, (kept if sums and set(kept) == set(sums) else None)


def _from_format_3(data: dict, where: str, device: Union[str, torch.device]) -> EditingState:
    """A file of format 3, or of format 2 (the same, with Kp Kpᵀ whole); Kp Kpᵀ made on ``device``."""
    _require(data, ("identity", "null_spaces", "context_templates", "earlier_keys_kkt_sum", "edit_log"),
             f"of format {data.get('format')}")
    sums, kept = _key_sums(data["earlier_keys_kkt_sum"], where, {}, device)
    state = EditingState(
        identity=data["identity"],
        null_spaces=_null_spaces(data["null_spaces"]),
        context_templates=data["context_templates"],
        earlier_keys_kkt_sum=sums,
        second_moments=_by_layer(data.get("second_moments", {})),
        reference_tensors={name: _by_layer(group) for name, group in data.get("reference_tensors", {}).items()},
        running_sums={name: _by_layer(group) for name, group in data.get("running_sums", {}).items()},
        edit_log=[_record_from_file(r) for r in data["edit_log"]],
    )
    state._kept_keys = kept
    return state


def _from_legacy_alphaedit(data: dict) -> EditingState:
    """A format-1 ``AlphaEditState`` file: its identity had no method (it was AlphaEdit's)."""
    _require(data, ("identity", "null_spaces", "context_templates", "previous_keys_cov", "edit_log"),
             f"of format {LEGACY_FORMAT}")
    identity = dict(data["identity"])
    identity.setdefault("method", "AlphaEdit")
    return EditingState(identity=identity, null_spaces=_null_spaces(data["null_spaces"]),
                        context_templates=data["context_templates"],
                        earlier_keys_kkt_sum=_by_layer(data["previous_keys_cov"]),
                        edit_log=[_record_from_file(r) for r in data["edit_log"]])


def _from_legacy_baseline(path: Path, data: dict) -> EditingState:
    """A format-1 ``BaselineState`` file and the ``<stem>.core<suffix>`` file written beside it."""
    _require(data, ("core_file", "identity", "second_moments", "original_weights", "raw_totals"),
             f"of format {LEGACY_FORMAT} ({path})")
    core_data = _read(path.parent / data["core_file"])
    if not isinstance(core_data, dict) or core_data.get("identity") != data["identity"]:
        raise ValueError(f"{path} and its core file {data['core_file']} belong to different states")
    core = _from_legacy_alphaedit(core_data)
    core.identity = dict(data["identity"])
    core.second_moments = _by_layer(data["second_moments"])
    if data["original_weights"]:
        core.reference_tensors = {"original_weights": _by_layer(data["original_weights"])}
        core.running_sums = {"raw_totals": _by_layer(data["raw_totals"])}
    return core


# Earlier names of the one state class.
AlphaEditState = EditingState
