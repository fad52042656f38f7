"""End-to-end editing on the tiny GPT-2 (Conv1D) and Llama (nn.Linear) models."""

import copy
import math

import pytest
import torch

from conftest import (
    BUILDERS,
    FACTS,
    assert_weights_unchanged,
    corpus_texts,
    exact_hparams,
    fact_key,
    make_hparams,
    mid_spectrum_threshold,
    module_inputs,
    next_token_log_probs,
    token_id,
    weights_snapshot,
)
from alphaedit_plugin import (
    AlphaEditState,
    apply_alphaedit_to_model,
    create_state,
    execute_alphaedit,
    normalise_requests,
)
from alphaedit_plugin import compute_targets
from alphaedit_plugin.architectures import templates_for, weight_as_out_in


def rewrite_name(model, hparams, layer):
    return templates_for(model, hparams).rewrite_module_tmp.format(layer)


def weight_out_in(model, hparams, layer):
    return weight_as_out_in(model.get_submodule(rewrite_name(model, hparams, layer))).detach().clone()


@pytest.fixture
def exact(tmp_path, arch, tokenizer):
    """Model, hparams with an exact null space (rank-deficient statistics) and a fresh state."""
    model = BUILDERS[arch]()
    hparams = exact_hparams(tmp_path, arch)
    return model, hparams, create_state(model, tokenizer, hparams)


def preserved_keys(model, tok, hparams, layer):
    texts = corpus_texts(hparams.mom2_dataset)
    assert all(len(t) >= 40 for t in texts), "every corpus line must be long enough to be used by the statistics"
    return torch.cat(module_inputs(model, tok, rewrite_name(model, hparams, layer), texts)).double()


# ---------------------------------------------------------------------------
# null-space preservation
# ---------------------------------------------------------------------------

def test_update_leaves_outputs_on_preserved_keys_unchanged(exact, tokenizer):
    model, hparams, state = exact
    texts = corpus_texts(hparams.mom2_dataset)
    keys = {layer: preserved_keys(model, tokenizer, hparams, layer) for layer in hparams.layers}
    before = {layer: weight_out_in(model, hparams, layer).double() for layer in hparams.layers}
    with torch.no_grad():
        logits_before = [model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits for t in texts]

    apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, state=state)

    for layer in hparams.layers:
        k0 = keys[layer]
        d_in = k0.shape[1]
        assert state.null_spaces[layer].rank == d_in - torch.linalg.matrix_rank(k0)  # the null space is exact
        delta = weight_out_in(model, hparams, layer).double() - before[layer]
        assert delta.norm() > 1e-2 * before[layer].norm(), f"layer {layer}: no update was made"
        change = (delta @ k0.T).norm() / (before[layer] @ k0.T).norm()
        assert change < 1e-4, f"layer {layer}: ‖ΔW K0‖/‖W K0‖ = {change:.2e}"
    # Every preserved token keeps its keys, so the whole model's output on the corpus is unchanged.
    with torch.no_grad():
        for text, old in zip(texts, logits_before):
            new = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits
            assert (new - old).norm() <= 1e-4 * old.norm()


def test_without_the_projection_the_same_edit_disturbs_preserved_keys(exact, tokenizer):
    """Control for the test above: with P = I (MEMIT-style) the preserved outputs do change."""
    model, hparams, state = exact
    for space in state.null_spaces.values():
        space.projector = torch.eye(space.projector.shape[0])
    layer = hparams.layers[0]
    k0 = preserved_keys(model, tokenizer, hparams, layer)
    before = weight_out_in(model, hparams, layer).double()
    apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, state=state)
    delta = weight_out_in(model, hparams, layer).double() - before
    assert (delta @ k0.T).norm() / (before @ k0.T).norm() > 1e-2


def full_rank_hparams(tmp_path, arch, model, tok):
    """40 corpus lines (full-rank statistics, some held out) and a threshold from the middle of the spectrum."""
    probe = make_hparams(tmp_path, arch)
    k0 = torch.cat(module_inputs(model, tok, rewrite_name(model, probe, 1), corpus_texts(probe.mom2_dataset)))
    return make_hparams(tmp_path, arch, nullspace_threshold=mid_spectrum_threshold(k0.T @ k0 / len(k0)))


def test_logged_preservation_matches_a_direct_computation(tmp_path, arch, tokenizer):
    model = BUILDERS[arch]()
    hparams = full_rank_hparams(tmp_path, arch, model, tokenizer)
    state = create_state(model, tokenizer, hparams)
    before = {layer: weight_out_in(model, hparams, layer) for layer in hparams.layers}
    apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, state=state)
    record = state.edit_log[-1]
    assert sorted(record.preservation) == hparams.layers
    for layer in hparams.layers:
        heldout = state.null_spaces[layer].heldout_keys.double()
        delta = weight_out_in(model, hparams, layer).double() - before[layer].double()
        expected = float((heldout @ delta.T).norm() / (heldout @ before[layer].double().T).norm())
        assert record.preservation[layer] == pytest.approx(expected, rel=1e-4)
        assert record.update_norms[layer] == pytest.approx(float(delta.norm()), rel=1e-4)


# ---------------------------------------------------------------------------
# edits take effect, and last
# ---------------------------------------------------------------------------

def log_prob(model, tok, fact, word=None):
    return float(next_token_log_probs(model, tok, fact["prompt"])[token_id(tok, word or fact["target_new"])])


def top_answer(model, tok, fact):
    return tok.convert_ids_to_tokens(int(next_token_log_probs(model, tok, fact["prompt"]).argmax()))


def test_edit_makes_the_new_target_beat_the_old_answer(exact, tokenizer):
    model, hparams, state = exact
    fact = FACTS[0]
    old_top = top_answer(model, tokenizer, fact)
    assert old_top != fact["target_new"]
    target_before = log_prob(model, tokenizer, fact)

    edited, _ = apply_alphaedit_to_model(model, tokenizer, [fact], hparams, state=state)

    assert edited is model
    assert log_prob(model, tokenizer, fact) > log_prob(model, tokenizer, fact, old_top)
    assert log_prob(model, tokenizer, fact) > target_before + 2.0
    record = state.edit_log[-1]
    assert len(state.edit_log) == 1 and state.edits_applied == 1
    assert record.requests[0]["subject"] == fact["subject"]
    assert 0 < record.target_probability[0] <= 1
    assert all(v > 0 for v in record.update_norms.values())


def test_second_edit_does_not_undo_the_first(exact, tokenizer):
    model, hparams, state = exact
    first, second = FACTS[0], FACTS[1]
    first_before, old_top = log_prob(model, tokenizer, first), top_answer(model, tokenizer, first)
    second_before = log_prob(model, tokenizer, second)

    apply_alphaedit_to_model(model, tokenizer, [first], hparams, state=state)
    apply_alphaedit_to_model(model, tokenizer, [second], hparams, state=state)

    assert log_prob(model, tokenizer, second) > second_before + 2.0
    assert log_prob(model, tokenizer, first) > first_before + 2.0
    assert log_prob(model, tokenizer, first) > log_prob(model, tokenizer, first, old_top)
    assert len(state.edit_log) == 2


def test_batched_edit_of_three_facts(exact, tokenizer):
    model, hparams, state = exact
    before = {f["subject"]: (log_prob(model, tokenizer, f), top_answer(model, tokenizer, f)) for f in FACTS}
    apply_alphaedit_to_model(model, tokenizer, FACTS, hparams, state=state)
    for fact in FACTS:
        target_before, old_top = before[fact["subject"]]
        assert log_prob(model, tokenizer, fact) > target_before + 2.0, fact
        if old_top != fact["target_new"]:
            assert log_prob(model, tokenizer, fact) > log_prob(model, tokenizer, fact, old_top), fact
    assert len(state.edit_log) == 1 and state.edits_applied == 3


def test_earlier_keys_kkt_sum_grows_by_the_new_keys(exact, tokenizer):
    model, hparams, state = exact
    assert all(float(c.abs().max()) == 0.0 for c in state.earlier_keys_kkt_sum.values())
    for batch in ([FACTS[0]], FACTS[1:]):
        cov_before = {layer: c.clone().double() for layer, c in state.earlier_keys_kkt_sum.items()}
        apply_alphaedit_to_model(model, tokenizer, batch, hparams, state=state)
        for layer in hparams.layers:
            # A layer's keys do not depend on its own weight or on layers above: read them off the edited model.
            keys = torch.stack([fact_key(model, tokenizer, rewrite_name(model, hparams, layer), f["prompt"],
                                         state.context_templates) for f in batch]).double()
            growth = state.earlier_keys_kkt_sum[layer].double() - cov_before[layer]
            expected = keys.T @ keys
            assert (growth - expected).norm() <= 1e-4 * expected.norm(), f"layer {layer}"


# ---------------------------------------------------------------------------
# the batched target search
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("stop_loss", [None, 0.7])
def test_batched_target_search_equals_one_by_one(exact, tokenizer, monkeypatch, stop_loss):
    model, hparams, state = exact
    if stop_loss is not None:  # a stopping loss that facts reach at different steps
        monkeypatch.setattr(compute_targets, "STOP_LOSS", stop_loss)
    requests = normalise_requests(FACTS)
    templates = templates_for(model, hparams)
    layer = hparams.layers[-1]
    batched = compute_targets.compute_target_values(model, tokenizer, requests, hparams, templates, layer,
                                                    state.context_templates)
    single = compute_targets.compute_target_values_one_by_one(model, tokenizer, requests, hparams, templates, layer,
                                                              state.context_templates)
    if stop_loss is not None:
        steps = [compute_targets.compute_target_values(model, tokenizer, [r], hparams, templates, layer,
                                                       state.context_templates).steps for r in requests]
        assert len(set(steps)) > 1, f"precondition: facts should stop at different steps, got {steps}"
    assert batched.values.shape == (3, model.config.hidden_size)
    assert (batched.values - batched.initial).norm() > 1.0
    assert torch.allclose(batched.initial, single.initial, rtol=1e-5, atol=1e-5)
    assert (batched.values - single.values).norm(dim=1).max() <= 1e-4 * single.values.norm(dim=1).min()
    assert batched.final_loss == pytest.approx(single.final_loss, rel=1e-4, abs=1e-5)
    assert batched.target_probability == pytest.approx(single.target_probability, rel=1e-4, abs=1e-5)


def test_target_search_in_token_chunks_equals_one_pass(exact, tokenizer):
    """A batch over the token budget is searched chunk by chunk (bounded memory) with the same result."""
    model, hparams, state = exact
    requests = normalise_requests(FACTS)
    templates = templates_for(model, hparams)
    layer = hparams.layers[-1]
    prompts = [compute_targets._fact_prompts(tokenizer, r, i, compute_targets.flatten(state.context_templates),
                                             hparams.fact_token) for i, r in enumerate(requests)]
    one_fact = max(len(p.rewrite) + 1 for p in prompts) * max(len(s) for p in prompts for s in p.rewrite + [p.kl])
    groups = compute_targets.chunk_by_tokens(prompts, budget=one_fact)
    assert sorted(i for g in groups for i in g) == [0, 1, 2] and len(groups) == 3
    assert compute_targets.chunk_by_tokens(prompts, budget=10 ** 9) == [[0, 1, 2]]
    assert compute_targets.chunk_by_tokens(prompts, budget=1) == [[0], [1], [2]]  # a fact over budget stays whole
    whole = compute_targets.compute_target_values(model, tokenizer, requests, hparams, templates, layer,
                                                  state.context_templates, tokens_per_pass=10 ** 9,
                                                  padding_tolerance=math.inf)
    chunked = compute_targets.compute_target_values(model, tokenizer, requests, hparams, templates, layer,
                                                    state.context_templates, tokens_per_pass=one_fact)
    assert (whole.values - whole.initial).norm() > 1.0
    assert torch.allclose(chunked.initial, whole.initial, rtol=1e-5, atol=1e-5)
    assert (chunked.values - whole.values).norm(dim=1).max() <= 1e-4 * whole.values.norm(dim=1).min()
    assert chunked.final_loss == pytest.approx(whole.final_loss, rel=1e-4, abs=1e-5)


def test_padding_is_counted_on_the_rows_as_the_pass_runs_them():
    """With the prefix cache a pass runs the rows from the subject on: context prefixes of unlike lengths pad
    nothing there, and two such facts share a chunk; counted on whole rows they would not."""
    def fact(first_token):
        rewrite = [[first_token] * 5, [first_token] * 25]  # no prefix and a 20-token prefix, the same 5 tokens on
        return compute_targets._FactPrompts(rewrite=rewrite, rewrite_lookups=[0, 20], target_ids=[7],
                                            kl=[first_token] * 6, kl_lookup=3)

    prompts = [fact(1), fact(2)]
    options = dict(budget=10 ** 6, padding_tolerance=0.25, by_width=True)
    assert compute_targets.chunk_by_tokens(prompts, **options, from_subject=True) == [[0, 1]]
    assert compute_targets.chunk_by_tokens(prompts, **options, from_subject=False) == [[0], [1]]


def test_chunks_group_facts_of_like_width_and_the_result_keeps_the_facts_order(exact, tokenizer, monkeypatch):
    """On the CPU a chunk is closed where padding would grow it by more than the tolerance: facts of unlike
    widths go to different chunks, out of their order, and the result comes back in the facts' order. (The
    tiny model's rows are far below the chunk size this applies from on the CPU: lowered to one token.)"""
    model, hparams, state = exact
    monkeypatch.setattr(compute_targets, "CPU_MIN_CHUNK_TOKENS", 1)
    long_prompt = {"prompt": "The famous scientist and the famous company of the city of Paris and Rome and "
                             "Berlin and Madrid made the river {} is in", "subject": "Nile", "target_new": "Japan"}
    requests = normalise_requests([long_prompt, FACTS[0], FACTS[1]])
    templates = templates_for(model, hparams)
    layer = hparams.layers[-1]
    prompts = [compute_targets._fact_prompts(tokenizer, r, i, compute_targets.flatten(state.context_templates),
                                             hparams.fact_token) for i, r in enumerate(requests)]
    widths = [max(len(s) for s in p.rewrite + [p.kl]) for p in prompts]
    assert widths[0] > 1.5 * max(widths[1:]), f"precondition: the first fact is the widest by far, {widths}"
    groups = compute_targets.chunk_by_tokens(prompts, 10 ** 9, padding_tolerance=0.25, by_width=True)
    assert groups[-1] == [0] and sorted(i for g in groups for i in g) == [0, 1, 2]
    assert compute_targets.chunk_by_tokens(prompts, 10 ** 9, by_width=True) == [sorted(range(3), key=widths.__getitem__)]
    small = compute_targets.chunk_by_tokens(prompts, 10 ** 9, padding_tolerance=0.25, by_width=True, min_tokens=10 ** 6)
    assert len(small) == 1  # a chunk under min_tokens is not cut for padding
    whole = compute_targets.compute_target_values(model, tokenizer, requests, hparams, templates, layer,
                                                  state.context_templates, padding_tolerance=math.inf)
    grouped = compute_targets.compute_target_values(model, tokenizer, requests, hparams, templates, layer,
                                                    state.context_templates)  # the CPU's tolerance
    assert (whole.values - whole.initial).norm() > 1.0
    assert torch.allclose(grouped.initial, whole.initial, rtol=1e-5, atol=1e-5)
    assert (grouped.values - whole.values).norm(dim=1).max() <= 1e-4 * whole.values.norm(dim=1).min()
    assert grouped.final_loss == pytest.approx(whole.final_loss, rel=1e-4, abs=1e-5)
    assert grouped.target_probability == pytest.approx(whole.target_probability, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------
# execute / apply contract
# ---------------------------------------------------------------------------

def test_execute_leaves_weights_bit_identical(exact, tokenizer):
    model, hparams, state = exact
    snapshot = weights_snapshot(model)
    update = execute_alphaedit(model, tokenizer, normalise_requests(FACTS[:2]), hparams, state)
    assert_weights_unchanged(model, snapshot)
    assert sorted(update.deltas) == hparams.layers
    assert all(update.deltas[layer].norm() > 0 for layer in hparams.layers)
    assert all(update.keys[layer].shape[0] == 2 for layer in hparams.layers)
    assert all(float(c.abs().max()) == 0.0 for c in state.earlier_keys_kkt_sum.values())
    assert state.edit_log == []


def test_apply_writes_exactly_the_executed_update(exact, tokenizer):
    model, hparams, state = exact
    twin = copy.deepcopy(model)
    update = execute_alphaedit(twin, tokenizer, normalise_requests([FACTS[0]]), hparams, state)
    apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, state=state)
    for layer in hparams.layers:
        expected = weight_out_in(twin, hparams, layer) + update.deltas[layer]
        assert torch.equal(weight_out_in(model, hparams, layer), expected)


def test_apply_twice_then_reset(exact, tokenizer):
    model, hparams, state = exact
    projectors = {layer: s.projector.clone() for layer, s in state.null_spaces.items()}
    apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, state=state)
    after_one = {layer: c.clone() for layer, c in state.earlier_keys_kkt_sum.items()}
    apply_alphaedit_to_model(model, tokenizer, [FACTS[1]], hparams, state=state)
    assert len(state.edit_log) == 2
    for layer in hparams.layers:
        assert state.earlier_keys_kkt_sum[layer].norm() > after_one[layer].norm() > 0
    state.reset()
    assert state.edit_log == [] and state.edits_applied == 0
    for layer in hparams.layers:
        assert torch.count_nonzero(state.earlier_keys_kkt_sum[layer]) == 0
        assert torch.equal(state.null_spaces[layer].projector, projectors[layer])


def test_state_save_load_round_trip(tmp_path, arch, tokenizer):
    model = BUILDERS[arch]()
    hparams = full_rank_hparams(tmp_path, arch, model, tokenizer)
    state = create_state(model, tokenizer, hparams)
    assert all(0 < s.rank < s.projector.shape[0] for s in state.null_spaces.values())
    apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, state=state)
    path = tmp_path / "states" / "state.pt"
    state.save(path)
    loaded = AlphaEditState.load(path)

    assert loaded.identity == state.identity
    assert loaded.context_templates == state.context_templates
    assert loaded.layers == state.layers == hparams.layers
    for layer in hparams.layers:
        a, b = state.null_spaces[layer], loaded.null_spaces[layer]
        assert torch.equal(a.projector, b.projector)
        assert (a.rank, a.token_count) == (b.rank, b.token_count)
        assert a.heldout_keys is not None and torch.equal(a.heldout_keys, b.heldout_keys)
        assert torch.equal(state.earlier_keys_kkt_sum[layer], loaded.earlier_keys_kkt_sum[layer])
        assert loaded.earlier_keys_kkt_sum[layer].norm() > 0
    assert loaded.edit_log == state.edit_log

    # The loaded state edits exactly as the original does.
    twin = copy.deepcopy(model)
    apply_alphaedit_to_model(model, tokenizer, [FACTS[1]], hparams, state=state)
    apply_alphaedit_to_model(twin, tokenizer, [FACTS[1]], hparams, state=loaded)
    for layer in hparams.layers:
        assert torch.equal(weight_out_in(model, hparams, layer), weight_out_in(twin, hparams, layer))
        assert torch.equal(state.earlier_keys_kkt_sum[layer], loaded.earlier_keys_kkt_sum[layer])


def test_copy_true_leaves_the_original_untouched(exact, tokenizer):
    model, hparams, state = exact
    snapshot = weights_snapshot(model)
    edited, _ = apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, copy=True, state=state)
    assert edited is not model
    assert_weights_unchanged(model, snapshot)
    changed = [n for n, t in edited.state_dict().items() if not torch.equal(t, snapshot[n])]
    assert sorted(changed) == sorted(f"{rewrite_name(model, hparams, l)}.weight" for l in hparams.layers)
    assert log_prob(edited, tokenizer, FACTS[0]) > log_prob(model, tokenizer, FACTS[0]) + 2.0


def test_return_orig_weights(exact, tokenizer):
    model, hparams, state = exact
    snapshot = weights_snapshot(model)
    _, originals = apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, return_orig_weights=True,
                                            keep_original_weight=True, state=state)
    names = {f"{rewrite_name(model, hparams, layer)}.weight" for layer in hparams.layers}
    assert set(originals) == names
    current = model.state_dict()
    for name in names:
        assert torch.equal(originals[name], snapshot[name])  # same layout as the parameter (Conv1D: (in, out))
        assert not torch.equal(current[name], snapshot[name])
    # EasyEdit restores an edit by writing these back.
    with torch.no_grad():
        for name, tensor in originals.items():
            model.get_parameter(name).copy_(tensor)
    assert_weights_unchanged(model, snapshot)
    _, nothing = apply_alphaedit_to_model(model, tokenizer, [FACTS[1]], hparams, state=state)
    assert nothing == {}
