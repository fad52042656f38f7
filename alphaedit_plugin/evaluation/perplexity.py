"""Perplexity on texts the statistics never saw: the held-out share of the statistics corpus.

The statistics of K0K0ᵀ leave out every ``1/mom2_heldout_fraction``-th text
of their corpus (:func:`..second_moment.is_heldout`). Those texts are
WikiText (or whatever ``mom2_dataset`` names) that no projector was built
from, so the perplexity on them measures what sequential edits do to the
model's language modelling beyond the knowledge the null space protects.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch

from ..tracing import pad_right, pad_token_id

TOKENS_PER_FORWARD = 2048  # padded tokens per forward pass


def heldout_sequences(model, tok, hparams, count: int) -> List[List[int]]:
    """The first ``count`` token sequences of ``hparams``' statistics corpus that its statistics leave out."""
    from ..layer_statistics import heldout_every, statistics_texts

    if count < 1:
        raise ValueError(f"the number of held-out texts must be at least 1, got {count}")
    every = heldout_every(hparams)
    if every == 0:
        raise ValueError("held-out perplexity needs texts the statistics leave out: mom2_heldout_fraction is 0 "
                         "in the method's hparams (set it to e.g. 0.1)")
    kept, held_out = statistics_texts(model, tok, hparams)
    if not held_out:
        raise ValueError(f"the statistics corpus {hparams.mom2_dataset!r} has no held-out text "
                         f"({len(kept)} texts, one in {every} held out)")
    return held_out[:count]


@torch.no_grad()
def perplexity(model, tok, sequences: Sequence[Sequence[int]]) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of ``sequences``."""
    usable = sorted((list(s) for s in sequences if len(s) >= 2), key=len)
    if not usable:
        raise ValueError("perplexity needs at least one sequence of 2 tokens or more")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, start = 0.0, 0, 0
    try:
        while start < len(usable):
            end = start + 1
            while end < len(usable) and (end - start + 1) * len(usable[end]) <= TOKENS_PER_FORWARD:
                end += 1
            batch = usable[start:end]
            input_ids, mask = pad_right(batch, pad_token_id(tok), device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             targets.reshape(-1), ignore_index=-100,
                                                             reduction="sum"))
            tokens += int((targets != -100).sum())
            start = end
    finally:
        model.train(was_training)
    return math.exp(total / tokens)
