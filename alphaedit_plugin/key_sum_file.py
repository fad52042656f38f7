"""How an editing state file holds Kp Kpᵀ (the sum of k kᵀ over earlier edits' keys): in its smallest exact form.

The sum is a symmetric (d_in, d_in) float32 matrix per edited layer: 9.4 MB for d_in = 1,536, 822 MB for
14,336. Written as it is, it makes a long run's resume state too large to keep (in git, for one). Two smaller
forms give back the very same bits:

- ``keys``: the keys of each commit, while there are fewer of them than d_in / 2 per layer (n·d_in numbers
  against d_in²). Reading sums them again with the step :meth:`EditingState.commit` takes
  (:func:`add_key_products`), batch after batch from zero; the file carries the SHA-256 of the saved sum, so
  that a sum made again with other rounding (another device or BLAS library) is told apart, not passed off as
  the same.
- ``upper``: the upper triangle, where the sum is exactly symmetric (as a sum of ``K.T @ K`` products is):
  d_in (d_in + 1) / 2 numbers.

Anything else (a sum that is not exactly symmetric) is written whole, as earlier versions did.
"""

from __future__ import annotations

import hashlib
from typing import List, Mapping, Optional, Tuple, Union

import torch

KeyBatches = List[torch.Tensor]  # per commit, the keys as rows: (n, d_in) float32 on the CPU


def key_operand(keys: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``keys`` (rows, (n, d_in)) as :func:`add_key_products` takes them: ``total``'s dtype and device, contiguous."""
    return keys.to(total).contiguous()


def add_key_products(total: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``total + Kᵀ K`` for ``keys`` from :func:`key_operand`: the one step of every Kp Kpᵀ sum (a commit's, and
    the sum made again from saved keys), so that both round alike."""
    return total + keys.T @ keys


def sum_of_key_products(batches: KeyBatches, like: torch.Tensor) -> torch.Tensor:
    """Σ Kᵀ K over ``batches`` in their order, from zero, in ``like``'s dtype and on its device."""
    total = torch.zeros_like(like)
    for keys in batches:
        total = add_key_products(total, key_operand(keys, total))
    return total


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's values (their bytes, on the CPU)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def pack_key_sum(total: torch.Tensor, batches: Optional[KeyBatches]) -> Union[torch.Tensor, dict]:
    """The smallest exact file form of one layer's Kp Kpᵀ ``total``; ``batches``: the keys it was summed from,
    or None where they were not kept. The keys are checked by summing them again on ``total``'s device (one
    d×d temporary there); the rest is done on the CPU."""
    total = total.detach()
    d = total.shape[0]
    if batches is not None and 2 * sum(k.shape[0] for k in batches) < d:
        if torch.equal(sum_of_key_products(batches, total), total):
            return {"form": "keys", "size": d, "dtype": str(total.dtype).replace("torch.", ""),
                    "batches": [k.cpu() for k in batches], "sha256": tensor_digest(total)}
    total = total.cpu()
    if torch.equal(total, total.T):
        # Row by row: no index tensors of d² entries (1.6 GB of them for d_in = 14,336).
        return {"form": "upper", "size": d, "values": torch.cat([total[i, i:] for i in range(d)])}
    return total


def unpack_key_sum(entry: Union[torch.Tensor, Mapping], where: str, device: Union[str, torch.device] = "cpu"
                   ) -> Tuple[torch.Tensor, Optional[KeyBatches], bool]:
    """Read what :func:`pack_key_sum` wrote (or a whole tensor, as earlier versions wrote) onto ``device``.

    Returns the sum, the key batches where the file holds them (None otherwise), and whether the sum is
    bit-identical to the one saved (False only where it was summed again here with other rounding).
    """
    if isinstance(entry, torch.Tensor):
        return entry.to(device), None, True
    form = entry.get("form") if isinstance(entry, Mapping) else None
    if form == "upper":
        d, values = int(entry["size"]), entry["values"]
        if values.shape != (d * (d + 1) // 2,):
            raise ValueError(f"{where}: the upper triangle of a {d}×{d} key sum has {d * (d + 1) // 2} values, "
                             f"not {tuple(values.shape)}")
        total, start = torch.empty(d, d, dtype=values.dtype), 0
        for i in range(d):
            row = values[start:start + d - i]
            total[i, i:] = row
            total[i:, i] = row
            start += d - i
        return total.to(device), None, True
    if form == "keys":
        d, dtype, batches = int(entry["size"]), getattr(torch, str(entry["dtype"])), list(entry["batches"])
        if any(k.dim() != 2 or k.shape[1] != d or k.dtype != dtype for k in batches):
            raise ValueError(f"{where}: the saved keys of a {d}×{d} key sum are not all (n, {d}) {entry['dtype']}: "
                             f"{[(tuple(k.shape), str(k.dtype)) for k in batches]}")
        like = torch.zeros(d, d, dtype=dtype, device=device)
        total = sum_of_key_products(batches, like)
        return total, batches, tensor_digest(total) == entry["sha256"]
    raise ValueError(f"{where}: not a key sum (a tensor, or a dict of form 'keys' or 'upper'); found "
                     f"{form if form is not None else type(entry).__name__!r}")
