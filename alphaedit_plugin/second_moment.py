"""Second-moment statistics K0K0ᵀ of the preserved knowledge's keys, per layer.

Keys are the inputs of the edited modules on every token of a text corpus.
All layers are collected in one pass, and the pass stops after the highest
edited block (nothing above it is needed). Texts are batched by length;
every ``heldout_every``-th text is kept out of the moment, and an evenly
spaced sample of its keys (at most ``heldout_keys`` rows) is kept instead, to
measure preservation on keys the projector was not built from.

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
) -> Dict[int, SecondMoment]:
    """Count-normalised K0K0ᵀ and a held-out key sample for each layer in ``module_names``."""
    device = next(model.parameters()).device
    batches = _batches(sequences, tokens_per_batch)
    layers = sorted(module_names)

    def is_heldout(index: int) -> bool:
        return heldout_every > 0 and index % heldout_every == heldout_every - 1

    heldout_total = sum(len(s) for i, s in enumerate(sequences) if is_heldout(i))
    stride = max(1, heldout_total // heldout_keys) if heldout_keys else 0
    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, int] = {layer: 0 for layer in layers}
    samples: Dict[int, List[torch.Tensor]] = {layer: [] for layer in layers}
    heldout_seen = 0
    done = 0
    if checkpoint_path is not None and checkpoint_key is not None:
        try:
            partial = cache.load_keyed(checkpoint_path, checkpoint_key)
        except cache.CacheError as error:
            logger.warning("ignoring unusable statistics checkpoint: %s", error)
            partial = None
        if partial is not None:
            done = int(partial["batches_done"])
            heldout_seen = int(partial["heldout_seen"])
            sums = {int(k): v.to(device) for k, v in partial["sums"].items()}
            counts = {int(k): int(v) for k, v in partial["counts"].items()}
            samples = {int(k): list(v) for k, v in partial["samples"].items()}
            logger.info("resuming statistics from checkpoint %s (%d of %d batches done)",
                        checkpoint_path, done, len(batches))

    pad = pad_token_id(tok)
    last_checkpoint = time.monotonic()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_inputs(model, [module_names[l] for l in layers]) as inputs, \
                stop_after(model, stop_module) as run:
            progress = tqdm(total=len(batches), initial=done, desc="second-moment statistics", unit="batch")
            for batch_number in range(done, len(batches)):
                indices = batches[batch_number]
                input_ids, attention_mask = pad_right([sequences[i] for i in indices], pad, device)
                run(input_ids=input_ids, attention_mask=attention_mask)
                heldout_rows = torch.tensor([is_heldout(i) for i in indices], device=device)
                token_mask = attention_mask.bool()
                heldout_tokens = heldout_rows[:, None].expand_as(token_mask)[token_mask]
                n_heldout = int(heldout_tokens.sum())
                # Evenly spaced sample of held-out tokens, counted across batches.
                picked = [j for j in range(n_heldout) if stride and (heldout_seen + j) % stride == 0]
                heldout_seen += n_heldout
                for layer in layers:
                    keys = inputs[module_names[layer]][token_mask].to(dtype)
                    main = keys[~heldout_tokens]
                    if layer not in sums:
                        sums[layer] = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64, device=device)
                    sums[layer] += (main.T @ main).to(torch.float64)
                    counts[layer] += int(main.shape[0])
                    if picked:
                        samples[layer].append(keys[heldout_tokens][picked].float().cpu())
                progress.update(1)
                if checkpoint_path is not None and time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    _checkpoint(checkpoint_path, checkpoint_key, batch_number + 1, heldout_seen, sums, counts,
                                samples)
                    last_checkpoint = time.monotonic()
            progress.close()
    finally:
        model.train(was_training)

    result = {}
    for layer in layers:
        if counts[layer] == 0:
            raise ValueError(f"layer {layer}: the corpus produced no tokens for the statistics")
        moment = (sums[layer] / counts[layer]).cpu()
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


def _checkpoint(path: Path, key: Optional[dict], batches_done: int, heldout_seen: int, sums, counts, samples) -> None:
    if key is None:
        return
    cache.save_keyed(path, key, {
        "batches_done": batches_done,
        "heldout_seen": heldout_seen,
        "sums": {str(k): v.cpu() for k, v in sums.items()},
        "counts": {str(k): v for k, v in counts.items()},
        "samples": {str(k): v for k, v in samples.items()},
    })
    logger.debug("statistics checkpoint written: %d batches", batches_done)
