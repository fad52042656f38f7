"""Second-moment statistics K0K0ᵀ of the preserved knowledge's keys, per layer.

Keys are the inputs of the edited modules on every token of a text corpus.
All layers are collected in one pass, and the pass stops after the highest
edited block (nothing above it is needed). Texts are batched by length;
every ``heldout_every``-th text is kept out of the moment, and an evenly
spaced sample of its keys (at most ``heldout_keys`` rows) is kept instead, to
measure preservation on keys the projector was not built from.

Memory: on a GPU each layer's products are summed on the layer's device in
the statistics dtype (float32: 4·d² bytes per layer), and every
``FLUSH_TOKENS`` tokens that partial sum is added into a float64 total kept
in CPU memory (8·d² bytes per layer). A float32 sum over a million tokens
keeps about six significant digits, far below the eigenvalue threshold's
scale; the float64 total keeps the rest. :func:`layer_groups` splits the
layers into passes whose device sums fit a memory budget. On the CPU each
batch's product goes straight into the float64 total (one d × d sum per
layer, in one pass).

The computation is streaming and checkpoints its running sums; an
interrupted run resumes from the last checkpoint if that was made for the
same key, and starts over otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import cache
from .tracing import capture_inputs, pad_right, pad_token_id, stop_after

logger = logging.getLogger(__name__)

TOKENS_PER_BATCH = 4096
CHECKPOINT_SECONDS = 60.0
FLUSH_TOKENS = 1 << 20


@dataclass
class SecondMoment:
    moment: torch.Tensor  # (d_in, d_in) float64, sum of k kᵀ divided by count
    count: int
    heldout_keys: Optional[torch.Tensor]  # (m, d_in) float32 sample of held-out keys


def _batches(sequences: Sequence[Sequence[int]], tokens_per_batch: int) -> List[List[int]]:
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    batches, current, width = [], [], 0
    for index in order:
        width = max(width, len(sequences[index])) if current else len(sequences[index])
        if current and width * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current, width = [], len(sequences[index])
        current.append(index)
    if current:
        batches.append(current)
    return batches


def is_heldout(index: int, heldout_every: int) -> bool:
    """Whether corpus text ``index`` is kept out of the moment (every ``heldout_every``-th; 0: none)."""
    return heldout_every > 0 and index % heldout_every == heldout_every - 1


def collect_second_moments(
    model,
    tok,
    sequences: Sequence[Sequence[int]],
    module_names: Dict[int, str],
    stop_module: str,
    heldout_every: int,
    dtype: torch.dtype,
    checkpoint_path: Optional[Path] = None,
    checkpoint_key: Optional[dict] = None,
    heldout_keys: int = 2048,
    tokens_per_batch: int = TOKENS_PER_BATCH,
    description: str = "second-moment statistics",
) -> Dict[int, SecondMoment]:
    """Count-normalised K0K0ᵀ and a held-out key sample for each layer in ``module_names``."""
    device = next(model.parameters()).device
    batches = _batches(sequences, tokens_per_batch)
    layers = sorted(module_names)

    heldout_total = sum(len(s) for i, s in enumerate(sequences) if is_heldout(i, heldout_every))
    stride = max(1, heldout_total // heldout_keys) if heldout_keys else 0
    sums: Dict[int, torch.Tensor] = {}  # float64 totals, in CPU memory
    device_sums: Dict[int, torch.Tensor] = {}  # the sums since the last flush, on the layer's device, in dtype
    since_flush = 0
    counts: Dict[int, int] = {layer: 0 for layer in layers}
    samples: Dict[int, List[torch.Tensor]] = {layer: [] for layer in layers}
    heldout_seen = 0
    done = 0
    if checkpoint_path is not None and checkpoint_key is not None:
        try:
            saved = cache.load_keyed(checkpoint_path, checkpoint_key)
        except cache.CacheError as error:
            logger.warning("ignoring unusable statistics checkpoint: %s", error)
            saved = None
        if saved is not None:
            done = int(saved["batches_done"])
            heldout_seen = int(saved["heldout_seen"])
            sums = {int(k): v.cpu().to(torch.float64) for k, v in saved["sums"].items()}
            counts = {int(k): int(v) for k, v in saved["counts"].items()}
            samples = {int(k): list(v) for k, v in saved["samples"].items()}
            device_sums = {int(k): v for k, v in saved.get("device_sums", {}).items()}
            since_flush = int(saved.get("since_flush", 0))
            logger.info("resuming statistics from checkpoint %s (%d of %d batches done)",
                        checkpoint_path, done, len(batches))

    pad = pad_token_id(tok)
    last_checkpoint = time.monotonic()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_inputs(model, [module_names[l] for l in layers]) as inputs, \
                stop_after(model, stop_module) as run:
            progress = tqdm(total=len(batches), initial=done, desc=description, unit="batch")
            for batch_number in range(done, len(batches)):
                indices = batches[batch_number]
                input_ids, attention_mask = pad_right([sequences[i] for i in indices], pad, device)
                run(input_ids=input_ids, attention_mask=attention_mask)
                heldout_rows = torch.tensor([is_heldout(i, heldout_every) for i in indices], device=device)
                token_mask = attention_mask.bool()
                heldout_tokens = heldout_rows[:, None].expand_as(token_mask)[token_mask]
                n_heldout = int(heldout_tokens.sum())
                # Evenly spaced sample of held-out tokens, counted across batches.
                picked = [j for j in range(n_heldout) if stride and (heldout_seen + j) % stride == 0]
                heldout_seen += n_heldout
                for layer in layers:
                    captured = inputs[module_names[layer]]  # on the layer's own device (a sharded model)
                    keys = captured[token_mask.to(captured.device)].to(dtype)
                    layer_heldout = heldout_tokens.to(captured.device)
                    main = keys[~layer_heldout]
                    if not accumulates_on_device(keys.device):
                        # In CPU memory the float64 total is the only sum: each batch's product is added into it
                        # (widened exactly, no float64 temporary), as the statistics always were.
                        if layer not in sums:
                            sums[layer] = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64)
                        sums[layer].add_(main.T @ main)
                    else:
                        if layer not in device_sums:
                            device_sums[layer] = torch.zeros(keys.shape[1], keys.shape[1], dtype=dtype,
                                                             device=keys.device)
                        elif device_sums[layer].device != keys.device:  # resumed from a checkpoint
                            device_sums[layer] = device_sums[layer].to(keys.device)
                        device_sums[layer].addmm_(main.T, main)
                    counts[layer] += int(main.shape[0])
                    if picked:
                        samples[layer].append(keys[layer_heldout][picked].float().cpu())
                progress.update(1)
                since_flush += int(token_mask.sum())
                # Flushes fall at fixed token counts, whenever checkpoints are written, so that a resumed run
                # adds the same numbers in the same order as an uninterrupted one.
                if since_flush >= FLUSH_TOKENS or batch_number == len(batches) - 1:
                    _flush(device_sums, sums)
                    since_flush = 0
                if checkpoint_path is not None and time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    _checkpoint(checkpoint_path, checkpoint_key, batch_number + 1, heldout_seen, sums, counts,
                                samples, device_sums, since_flush)
                    last_checkpoint = time.monotonic()
            progress.close()
    finally:
        model.train(was_training)

    result = {}
    for layer in layers:
        if counts[layer] == 0:
            raise ValueError(f"layer {layer}: the corpus produced no tokens for the statistics")
        moment = sums.pop(layer).div_(counts[layer])
        if not torch.isfinite(moment).all():
            raise FloatingPointError(f"layer {layer}: the second-moment statistics contain NaN or inf")
        result[layer] = SecondMoment(
            moment=moment,
            count=counts[layer],
            heldout_keys=torch.cat(samples[layer])[:heldout_keys] if samples[layer] else None,
        )
    if checkpoint_path is not None and checkpoint_path.exists():
        checkpoint_path.unlink()
    return result


def accumulates_on_device(device: torch.device) -> bool:
    """Whether keys on ``device`` are summed there first (a GPU) or straight into the float64 totals (the CPU)."""
    return device.type != "cpu"


def _flush(partial: Dict[int, torch.Tensor], totals: Dict[int, torch.Tensor]) -> None:
    """Add the device's partial sums into the float64 totals in CPU memory, and zero them."""
    for layer, value in partial.items():
        if layer not in totals:
            totals[layer] = torch.zeros(value.shape, dtype=torch.float64)
        totals[layer].add_(value.cpu())  # in the statistics dtype over the bus, widened exactly as it is added
        value.zero_()


def layer_groups(widths: Dict[int, int], dtype: torch.dtype, budget_bytes: float) -> List[List[int]]:
    """Consecutive groups of layers whose d × d sums in ``dtype`` fit ``budget_bytes`` together (at least one
    layer a group); each group is one pass over the corpus."""
    groups: List[List[int]] = []
    used = 0.0
    element = torch.empty((), dtype=dtype).element_size()
    for layer in sorted(widths):
        size = widths[layer] ** 2 * element
        if groups and used + size <= budget_bytes:
            groups[-1].append(layer)
            used += size
        else:
            groups.append([layer])
            used = size
    return groups


def _checkpoint(path: Path, key: Optional[dict], batches_done: int, heldout_seen: int, sums, counts, samples,
                device_sums, since_flush: int) -> None:
    if key is None:
        return
    cache.save_keyed(path, key, {
        "batches_done": batches_done,
        "heldout_seen": heldout_seen,
        "sums": {str(k): v.cpu() for k, v in sums.items()},
        "counts": {str(k): v for k, v in counts.items()},
        "samples": {str(k): v for k, v in samples.items()},
        "device_sums": {str(k): v.cpu() for k, v in device_sums.items()},
        "since_flush": since_flush,
    })
    logger.debug("statistics checkpoint written: %d batches", batches_done)
