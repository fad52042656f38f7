"""``P_loc``: a precomputed projector in EasyEdit's format, checked before it is used.

EasyEdit's AlphaEdit saves and reads P as one tensor of shape
``(len(layers), d, d)`` written with ``torch.save`` (slice i for the i-th
edited layer, d the number of inputs of the edited module); the AlphaEdit
authors distribute such a file for Llama-3-8B. The plugin reads it without
pickle (``weights_only``) and refuses it, with both shapes in the message,
unless it has one d×d slice per edited layer of this model and each slice is
a symmetric idempotent projector. The check is randomised (P applied to a few
random vectors: ‖Px − Pᵀx‖ and ‖P(Px) − Px‖ against ‖Px‖), so that a 14,336-wide
P is checked in O(d²), not O(d³).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Dict, List

import torch

from .errors import ProjectorMismatchError
from .layer_statistics import LayerNullSpace

logger = logging.getLogger(__name__)

PROBE_VECTORS = 8
TOLERANCE = 1e-3


def file_identity(path) -> Dict[str, str]:
    """What a state made with this file belongs to: its name and a hash of its content."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"file": path.name, "sha256": _content_hash(str(path), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=8)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per file version (a Llama-3-8B P is 4 GB; the adapter asks for the identity at every edit)."""
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def load_projector_file(path, layers: List[int], inputs_per_layer: Dict[int, int]) -> Dict[int, LayerNullSpace]:
    """The null spaces of ``layers`` from the EasyEdit-format file at ``path``; ``inputs_per_layer``: each edited
    module's number of inputs d. Raises :class:`ProjectorMismatchError` naming what does not fit."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ProjectorMismatchError(f"P_loc {path}: cannot be read as a tensor file without pickle "
                                     f"({type(error).__name__}: {error})") from error
    if not isinstance(data, torch.Tensor):
        raise ProjectorMismatchError(f"P_loc {path} holds a {type(data).__name__}, not a tensor of shape "
                                     "(layers, d, d) as EasyEdit saves it")
    widths = sorted(set(inputs_per_layer.values()))
    d = widths[0]
    expected = (len(layers), d, d)
    if len(widths) != 1 or tuple(data.shape) != expected:
        raise ProjectorMismatchError(
            f"P_loc {path} holds a tensor of shape {tuple(data.shape)}; this edit needs {expected}: one d x d "
            f"projector per edited layer {list(layers)}, d = {widths if len(widths) > 1 else d} inputs of the edited "
            "module. It was made for another model or other layers")
    if not torch.isfinite(data).all():
        raise ProjectorMismatchError(f"P_loc {path} holds NaN or inf")
    generator = torch.Generator().manual_seed(0)
    result = {}
    for index, layer in enumerate(layers):
        p = data[index].to(torch.float64)
        x = torch.randn(d, PROBE_VECTORS, generator=generator, dtype=torch.float64)
        px = p @ x
        scale = px.norm().clamp_min(1e-12)
        asymmetry = float((p.T @ x - px).norm() / scale)
        not_idempotent = float((p @ px - px).norm() / scale)
        if asymmetry > TOLERANCE or not_idempotent > TOLERANCE:
            raise ProjectorMismatchError(
                f"P_loc {path}: slice {index} (layer {layer}) is not a symmetric idempotent projector "
                f"(‖Px − Pᵀx‖/‖Px‖ = {asymmetry:.2g}, ‖P²x − Px‖/‖Px‖ = {not_idempotent:.2g}, tolerance {TOLERANCE})")
        rank = int(round(float(torch.trace(p))))
        result[layer] = LayerNullSpace(projector=data[index].float().contiguous(), rank=rank, heldout_keys=None,
                                       token_count=0)
        logger.info("layer %d: projector from P_loc %s (null-space rank %d of %d)", layer, path, rank, d)
    return result
