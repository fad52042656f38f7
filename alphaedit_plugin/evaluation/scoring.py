"""What the metrics ask of a model, behind one small interface (so that tests can hand in a fake).

A *scorer* has three methods:

- ``nll(pairs)``: mean per-token negative log-likelihood of each answer
  (leading space added) after its prompt (:func:`answer_nll`);
- ``token_predictions(pairs)``: teacher-forced top-1 tokens at each answer
  position, with the answer's own tokens: ``[(predicted_ids, answer_ids)]``;
- ``generate(prompts, max_new_tokens, sample=False, top_k=5, seed=0)``: the
  continuation text of each prompt (greedy, or top-k sampling seeded per batch of prompts).

:class:`ModelScorer` implements them on a Hugging Face causal LM.
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..tracing import encode, pad_right, pad_token_id, prompt_and_answer_ids

Pair = Tuple[str, str]
GENERATION_BATCH = 16  # prompts per generate() call
PAIRS_PER_FORWARD = 64


def answer_sequences(tok, pairs: Sequence[Tuple[str, str]]) -> Tuple[List[List[int]], List[Tuple[int, List[int]]]]:
    """Per pair, the ids of prompt + answer and ``(where the answer starts, its ids)``."""
    sequences, spans = [], []
    for prompt, answer in pairs:
        prompt_ids, answer_ids = prompt_and_answer_ids(tok, prompt, answer)
        sequences.append(prompt_ids + answer_ids)
        spans.append((len(prompt_ids), answer_ids))
    return sequences, spans


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """The model's logits at the given (row, position) pairs only, as ``(pairs, vocabulary)``.

    The output head is applied to the hidden states of those positions alone (a pre-hook hands it just
    them), so whatever the model's forward does after its head (soft-capping, logit scaling) still applies;
    the full-vocabulary logits of every other position are never formed. A model whose forward does not
    return them in that shape is scored in full instead.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not isinstance(head, torch.nn.Embedding):
        def gather(module, args):
            return (args[0][rows, positions],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(gather)
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            handle.remove()
        if logits.shape[:-1] == (len(rows),):
            return logits
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, positions]


def _answer_positions(spans, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, positions that predict each answer token, and those tokens, for a chunk of ``spans``."""
    rows, positions, tokens = [], [], []
    for row, (offset, answer_ids) in enumerate(spans):
        rows += [row] * len(answer_ids)
        positions += range(offset - 1, offset - 1 + len(answer_ids))
        tokens += answer_ids
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return as_tensor(rows), as_tensor(positions), as_tensor(tokens)


@torch.no_grad()
def answer_nll(model, tok, pairs: Sequence[Tuple[str, str]]) -> List[float]:
    """Mean per-token negative log-likelihood of each answer (leading space added) after its prompt."""
    device = next(model.parameters()).device
    sequences, spans = answer_sequences(tok, pairs)
    result: List[float] = []
    starts = range(0, len(sequences), PAIRS_PER_FORWARD)
    for start in tqdm(starts, desc=f"scoring {len(pairs)} answers", unit="batch", disable=len(starts) < 8,
                      leave=False):
        chunk, chunk_spans = sequences[start:start + PAIRS_PER_FORWARD], spans[start:start + PAIRS_PER_FORWARD]
        input_ids, mask = pad_right(chunk, pad_token_id(tok), device)
        rows, positions, tokens = _answer_positions(chunk_spans, device)
        log_probs = logits_at(model, input_ids, mask, rows, positions).float().log_softmax(-1)
        picked = log_probs.gather(1, tokens[:, None]).squeeze(1)
        totals = torch.zeros(len(chunk), device=device).index_add(0, rows, picked)
        counts = torch.tensor([len(answer) for _, answer in chunk_spans], device=device)
        result += (-(totals / counts)).tolist()
    return result


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """Share of answer positions whose top-1 prediction is the answer's token (EasyEdit's ``token_em``)."""
    if not target:
        return 0.0
    return sum(int(p == t) for p, t in zip(predicted, target)) / len(target)


def token_agreement(before: Sequence[int], after: Sequence[int]) -> float:
    """Share of positions where two prediction lists agree (EasyEdit's locality)."""
    if not before:
        return 1.0
    return sum(int(a == b) for a, b in zip(before, after)) / len(before)


class ModelScorer:
    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    @property
    def device(self):
        return next(self.model.parameters()).device

    def nll(self, pairs: Sequence[Pair]) -> List[float]:
        return answer_nll(self.model, self.tok, pairs) if pairs else []

    @torch.no_grad()
    def token_predictions(self, pairs: Sequence[Pair]) -> List[Tuple[List[int], List[int]]]:
        sequences, spans = answer_sequences(self.tok, pairs)
        result = []
        for start in range(0, len(sequences), PAIRS_PER_FORWARD):
            chunk = sequences[start:start + PAIRS_PER_FORWARD]
            chunk_spans = spans[start:start + PAIRS_PER_FORWARD]
            input_ids, mask = pad_right(chunk, pad_token_id(self.tok), self.device)
            rows, positions, _ = _answer_positions(chunk_spans, self.device)
            top = logits_at(self.model, input_ids, mask, rows, positions).argmax(-1).tolist()
            for _, answer_ids in chunk_spans:
                predicted, top = top[:len(answer_ids)], top[len(answer_ids):]
                result.append((predicted, list(answer_ids)))
        return result

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, sample: bool = False, top_k: int = 5,
                 seed: int = 0) -> List[str]:
        """Continuations of ``prompts``, generated ``GENERATION_BATCH`` prompts at a time (left-padded).

        Greedy text is what one prompt at a time gives (up to float rounding of the padded batch).
        Sampling is seeded per batch with ``seed + index of the batch's first prompt``, so a run is
        repeatable for the same prompts and batch size.
        """
        texts: List[str] = []
        pad = pad_token_id(self.tok)
        starts = range(0, len(prompts), GENERATION_BATCH)
        for start in tqdm(starts, desc=f"generating {max_new_tokens} tokens for {len(prompts)} prompts",
                          unit="batch", disable=len(starts) < 4, leave=False):
            encoded = [encode(self.tok, prompt) for prompt in prompts[start:start + GENERATION_BATCH]]
            input_ids, mask = pad_left(encoded, pad, self.device)
            options = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, attention_mask=mask)
            if sample:
                torch.manual_seed(seed + start)
                options.update(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0)
            else:
                options.update(do_sample=False, top_k=None, top_p=None, temperature=None)
            out = self.model.generate(input_ids, **options)
            texts += [self.tok.decode(row[input_ids.shape[1]:].tolist(), skip_special_tokens=True) for row in out]
        return texts


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``: every prompt ends at the last column, where generation
    continues (the model derives positions from the mask)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return input_ids.to(device), mask.to(device)


class EvalOptions:
    """Settings shared by the metric families (all have defaults; the CLI exposes them)."""

    def __init__(self, fluency: bool = False, fluency_prompts: int = 1, generation_tokens: int = 100,
                 answer_tokens: int = 16, cot: bool = True, cot_tokens: int = 96, seed: int = 0,
                 snippets=None):
        self.fluency = fluency  # generate text for Fluency/Consistency (slow on a CPU)
        self.fluency_prompts = fluency_prompts  # generation prompts per case (ROME uses all, up to 10)
        self.generation_tokens = generation_tokens  # new tokens per generation for Fluency (ROME: 100 in all)
        self.answer_tokens = answer_tokens  # new tokens of a short generated answer (MQuAKE)
        self.cot = cot  # MQuAKE chain-of-thought variant
        self.cot_tokens = cot_tokens
        self.seed = seed
        self.snippets = snippets  # reference texts for Consistency: {(relation_id, target_id): [text]}

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "snippets"} | {"snippets": self.snippets is not None}


def percent(values: Sequence[float]):
    """100 × the mean, or None for no values."""
    values = list(values)
    return 100 * sum(values) / len(values) if values else None
