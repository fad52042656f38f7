"""The target search with the prefix computed once equals the full recomputation."""

import math

import pytest
import torch

from conftest import BUILDERS
from alphaedit_plugin import AlphaEditHyperParams, normalise_requests
from alphaedit_plugin.architectures import templates_for
from alphaedit_plugin.compute_targets import compute_target_values
from alphaedit_plugin.prefix_cache import split_at

REQUESTS = [
    {"prompt": "The capital of France", "subject": "France", "target_new": "Rome"},
    {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy"},  # subject at position 0
    {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Berlin Madrid"},  # two tokens
]
CONTEXTS = [["{}"], ["The city of. {}", "Because I. {}"]]


@pytest.mark.parametrize("steps", [1, 8])
def test_prefix_cache_gives_the_full_pass_result(arch, tokenizer, steps):
    model = BUILDERS[arch]()
    hparams = AlphaEditHyperParams(layers=[1, 2], v_num_grad_steps=steps, v_lr=0.5, clamp_norm_factor=10,
                                   v_weight_decay=1e-3)
    templates = templates_for(model, hparams)
    requests = normalise_requests(REQUESTS)
    full = compute_target_values(model, tokenizer, requests, hparams, templates, 2, CONTEXTS, use_prefix_cache=False)
    cached = compute_target_values(model, tokenizer, requests, hparams, templates, 2, CONTEXTS, use_prefix_cache=True)
    assert torch.allclose(cached.initial, full.initial, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cached.values, full.values, rtol=1e-4, atol=1e-4)
    assert cached.final_loss == pytest.approx(full.final_loss, rel=1e-4, abs=1e-5)
    if steps > 1:
        assert not torch.allclose(full.values, full.initial)  # the search moved: the comparison means something


def test_split_runs_only_the_suffix_and_keeps_positions(tokenizer):
    model = BUILDERS["llama"]()
    sequences = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    split = split_at(model, sequences, [2, 0, 1], pad=1, device="cpu")
    assert split.suffix_ids.tolist() == [[7, 8], [9, 10], [12, 13]]
    assert split.position_ids.tolist() == [[2, 3], [0, 1], [1, 2]]
    assert split.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    with torch.no_grad():  # the last token's logits match an unpadded full pass for every row
        out = model(**split.forward_inputs()).logits
        for row, seq in enumerate(sequences):
            reference = model(input_ids=torch.tensor([seq])).logits[0, -1]
            last = len(seq) - [2, 0, 1][row] - 1
            assert torch.allclose(out[row, last], reference, atol=1e-4), row


def test_split_without_any_prefix_is_refused():
    with pytest.raises(ValueError, match="no row has a prefix"):
        split_at(BUILDERS["gpt2"](), [[5, 6], [7]], [0, 0], pad=1, device="cpu")


def test_selected_rows_give_their_own_full_pass_result(tokenizer):
    model = BUILDERS["gpt2"]()
    sequences = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    cuts = [2, 0, 1]
    split = split_at(model, sequences, cuts, pad=1, device="cpu").select([2, 0])
    with torch.no_grad():
        out = model(**split.forward_inputs()).logits
        for row, original in enumerate([2, 0]):
            seq = sequences[original]
            reference = model(input_ids=torch.tensor([seq])).logits[0, -1]
            assert torch.allclose(out[row, len(seq) - cuts[original] - 1], reference, atol=1e-4), original


def test_facts_that_leave_the_search_reuse_the_prefix_pass(arch, tokenizer, monkeypatch):
    """One prefix pass per search, also when converged facts leave the batch; same result as the full pass."""
    import alphaedit_plugin.compute_targets as targets

    model = BUILDERS[arch]()
    hparams = AlphaEditHyperParams(layers=[1, 2], v_num_grad_steps=12, v_lr=0.5, clamp_norm_factor=10,
                                   v_weight_decay=1e-3)
    templates = templates_for(model, hparams)
    requests = normalise_requests(REQUESTS)
    full = compute_target_values(model, tokenizer, requests, hparams, templates, 2, CONTEXTS, use_prefix_cache=False)
    # A stopping loss between the facts' losses at the end, so that some facts leave and others stay.
    losses = sorted(full.final_loss)
    monkeypatch.setattr(targets, "STOP_LOSS", (losses[0] + losses[-1]) / 2)
    full = compute_target_values(model, tokenizer, requests, hparams, templates, 2, CONTEXTS, use_prefix_cache=False)
    calls = []
    original = targets.split_at
    monkeypatch.setattr(targets, "split_at", lambda *a, **k: calls.append(1) or original(*a, **k))
    cached = compute_target_values(model, tokenizer, requests, hparams, templates, 2, CONTEXTS, use_prefix_cache=True,
                                   padding_tolerance=math.inf)  # one chunk: one search
    assert len(calls) == 1
    assert any(loss < targets.STOP_LOSS for loss in full.final_loss)  # some facts left early
    assert any(loss >= targets.STOP_LOSS for loss in full.final_loss)  # and others stayed
    assert torch.allclose(cached.values, full.values, rtol=1e-4, atol=1e-4)
    assert cached.final_loss == pytest.approx(full.final_loss, rel=1e-4, abs=1e-5)
