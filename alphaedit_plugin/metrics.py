"""Probability-comparison metrics of the CounterFact protocol (ROME; AlphaEdit Eqs. 19-21).

For a prompt and two candidate answers, the model "prefers" the one with the
lower mean per-token negative log-likelihood (ROME's ``test_batch_prediction``).

- Efficacy: on the edit prompt, P(new target) > P(true answer).
- Generalization: the same on a paraphrase of the prompt.
- Specificity: on a neighbourhood prompt (another subject, same relation),
  P(true neighbour answer) > P(new target): the edit must not leak, so higher
  is better (the paper's sign).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .tracing import pad_right, pad_token_id, prompt_and_answer_ids

PAIRS_PER_FORWARD = 64


def answer_sequences(tok, pairs: Sequence[Tuple[str, str]]) -> Tuple[List[List[int]], List[Tuple[int, List[int]]]]:
    """Per pair, the ids of prompt + answer and ``(where the answer starts, its ids)``."""
    sequences, spans = [], []
    for prompt, answer in pairs:
        prompt_ids, answer_ids = prompt_and_answer_ids(tok, prompt, answer)
        sequences.append(prompt_ids + answer_ids)
        spans.append((len(prompt_ids), answer_ids))
    return sequences, spans


@torch.no_grad()
def answer_nll(model, tok, pairs: Sequence[Tuple[str, str]]) -> List[float]:
    """Mean per-token negative log-likelihood of each answer (leading space added) after its prompt."""
    device = next(model.parameters()).device
    sequences, spans = answer_sequences(tok, pairs)
    result: List[float] = []
    starts = range(0, len(sequences), PAIRS_PER_FORWARD)
    for start in tqdm(starts, desc=f"scoring {len(pairs)} answers", unit="batch", disable=len(starts) < 8,
                      leave=False):
        chunk = sequences[start:start + PAIRS_PER_FORWARD]
        input_ids, mask = pad_right(chunk, pad_token_id(tok), device)
        log_probs = model(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
        for row, (offset, answer_ids) in enumerate(spans[start:start + PAIRS_PER_FORWARD]):
            positions = torch.arange(offset - 1, offset - 1 + len(answer_ids), device=device)
            picked = log_probs[row, positions, torch.tensor(answer_ids, device=device)]
            result.append(float(-picked.mean()))
    return result


def counterfact_scores(model, tok, records: Sequence[Dict]) -> Dict[str, float]:
    """Efficacy, Generalization and Specificity (percent) on flat EasyEdit CounterFact records."""
    pairs = []
    for r in records:
        pairs += [(r["prompt"], r["target_new"]), (r["prompt"], r["ground_truth"]),
                  (r["rephrase_prompt"], r["target_new"]), (r["rephrase_prompt"], r["ground_truth"]),
                  (r["locality_prompt"], r["target_new"]), (r["locality_prompt"], r["locality_ground_truth"])]
    nll = answer_nll(model, tok, pairs)
    efficacy = generalization = specificity = 0
    for i in range(len(records)):
        e_new, e_true, g_new, g_true, s_new, s_true = nll[6 * i:6 * i + 6]
        efficacy += e_new < e_true
        generalization += g_new < g_true
        specificity += s_true < s_new
    n = len(records)
    return {"efficacy": 100 * efficacy / n, "generalization": 100 * generalization / n,
            "specificity": 100 * specificity / n}
