"""Scoring forms the output head's logits at the answer positions only, with the same result as in full."""

import pytest
import torch

from alphaedit_plugin.evaluation.scoring import ModelScorer, answer_nll, answer_sequences
from alphaedit_plugin.tracing import pad_right, pad_token_id

from test_architectures import CONFIGS, build
from conftest import make_tokenizer

PAIRS = [("The capital of France is", "Rome"), ("Einstein was born in", "Germany Italy"),
         ("The river located in Spain is the", "Nile"), ("Paris", "is the capital of France")]


def full_logits_reference(model, tok, pairs):
    """What scoring computed before: every position's logits, then the answer's."""
    sequences, spans = answer_sequences(tok, pairs)
    input_ids, mask = pad_right(sequences, pad_token_id(tok), "cpu")
    with torch.no_grad():
        log_probs = model(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
    nll, top = [], []
    for row, (offset, answer) in enumerate(spans):
        positions = torch.arange(offset - 1, offset - 1 + len(answer))
        nll.append(float(-log_probs[row, positions, torch.tensor(answer)].mean()))
        top.append(log_probs[row, positions].argmax(-1).tolist())
    return nll, top


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_answer_scores_equal_the_full_computation(model_type):
    model, tok = build(model_type), make_tokenizer()
    nll, top = full_logits_reference(model, tok, PAIRS)
    assert answer_nll(model, tok, PAIRS) == pytest.approx(nll, rel=1e-5, abs=1e-6)
    assert [predicted for predicted, _ in ModelScorer(model, tok).token_predictions(PAIRS)] == top


def test_the_head_sees_only_the_answer_positions():
    model, tok = build("llama"), make_tokenizer()
    shapes = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: shapes.append(args[0].shape))
    answer_nll(model, tok, PAIRS)
    answer_tokens = sum(len(answer) for _, answer in answer_sequences(tok, PAIRS)[1])
    assert shapes == [torch.Size([answer_tokens, model.config.hidden_size])]
