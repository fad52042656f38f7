"""The editor keeps its promises: atomic under interruption, independent of the caller's modes and threads,
re-checked hyperparameters, a state that belongs to weights, honest outcomes, and clear errors before any
statistics or search. Tiny random GPT-2 and Llama models."""

from __future__ import annotations

import copy
import logging
import random
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import (BUILDERS, FACTS, assert_weights_unchanged, exact_hparams, make_hparams, make_tokenizer,
                      weights_snapshot)
from transformers import LlamaConfig, LlamaForCausalLM

import alphaedit_plugin
from alphaedit_plugin import (AlphaEditHyperParams, RequestError, StateMismatchError, apply_alphaedit_to_model,
                              apply_to_model, create_state, edit_loop)
from alphaedit_plugin.corpus import CorpusError

PACKAGE = str(Path(alphaedit_plugin.__file__).parent)


def state_summary(state):
    return (state.edits_applied, {l: v.clone() for l, v in state.earlier_keys_kkt_sum.items()})


def same_state(state, summary) -> bool:
    edits, sums = summary
    return state.edits_applied == edits and all(torch.equal(state.earlier_keys_kkt_sum[l], v) for l, v in sums.items())


@pytest.fixture
def setting(tmp_path, tokenizer):
    """A tiny Llama, its state (made once), and the result of one uninterrupted edit of FACTS[:2]."""
    hparams = exact_hparams(tmp_path, "llama", v_num_grad_steps=4)
    model = BUILDERS["llama"]()
    state = create_state(model, tokenizer, hparams)
    edited, edited_state = copy.deepcopy(model), copy.deepcopy(state)
    apply_to_model(edited, tokenizer, FACTS[:2], hparams, state=edited_state)
    return model, state, hparams, weights_snapshot(edited), state_summary(edited_state)


def before_or_after(model, state, before, before_state, after, after_state) -> str:
    current = model.state_dict()
    if all(torch.equal(current[k], v) for k, v in before.items()) and same_state(state, before_state):
        return "before"
    if all(torch.equal(current[k], v) for k, v in after.items()) and same_state(state, after_state):
        return "after"
    return "corrupted"


# ---------------------------------------------------------------------------
# 1. Atomic under any interruption
# ---------------------------------------------------------------------------
def test_an_interrupt_at_every_weight_write_leaves_weights_and_state_as_before(setting, tokenizer, monkeypatch):
    model, state, hparams, _, _ = setting
    writes = 2 * len(hparams.layers)  # compute_update's live additions, then apply_update's
    real = edit_loop.add_to_weight
    for interrupt_at in range(1, writes + 1):
        calls = []

        def interrupting(module, delta):
            calls.append(1)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            real(module, delta)

        monkeypatch.setattr(edit_loop, "add_to_weight", interrupting)
        snapshot, summary = weights_snapshot(model), state_summary(state)
        with pytest.raises(KeyboardInterrupt):
            apply_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
        assert_weights_unchanged(model, snapshot)
        assert same_state(state, summary), interrupt_at


def test_an_interrupt_while_committing_or_logging_leaves_before_or_after(setting, tokenizer, monkeypatch):
    model, state, hparams, after, after_state = setting
    before, before_state = weights_snapshot(model), state_summary(state)
    original_commit = type(state).commit

    def interrupted_commit(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(state), "commit", interrupted_commit)
    with pytest.raises(KeyboardInterrupt):
        apply_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
    assert before_or_after(model, state, before, before_state, after, after_state) == "before"
    monkeypatch.setattr(type(state), "commit", original_commit)

    real_info = edit_loop.logger.info

    def interrupted_log(message, *args):
        if message.startswith("%s: %d request(s)"):
            raise KeyboardInterrupt
        real_info(message, *args)

    monkeypatch.setattr(edit_loop.logger, "info", interrupted_log)
    with pytest.raises(KeyboardInterrupt):
        apply_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
    assert before_or_after(model, state, before, before_state, after, after_state) == "after"


def test_an_interrupt_at_random_moments_leaves_before_or_after(setting, tokenizer):
    """KeyboardInterrupt raised at the n-th line the package executes during an edit, for random n."""
    model, state, hparams, after, after_state = setting
    lines = []

    def counting(frame, event, arg):
        if event == "line" and frame.f_code.co_filename.startswith(PACKAGE):
            lines.append(1)
        return counting

    trial_model, trial_state = copy.deepcopy(model), copy.deepcopy(state)
    sys.settrace(counting)
    try:
        apply_to_model(trial_model, tokenizer, FACTS[:2], hparams, state=trial_state)
    finally:
        sys.settrace(None)
    total = len(lines)
    outcomes = []
    for point in sorted(random.Random(0).sample(range(1, total), 25)) + [total - 3, total - 1]:
        trial_model, trial_state = copy.deepcopy(model), copy.deepcopy(state)
        before, before_state = weights_snapshot(trial_model), state_summary(trial_state)
        seen = [0]

        def interrupting(frame, event, arg, point=point):
            if event == "line" and frame.f_code.co_filename.startswith(PACKAGE):
                seen[0] += 1
                if seen[0] == point:
                    raise KeyboardInterrupt
            return interrupting

        sys.settrace(interrupting)
        try:
            apply_to_model(trial_model, tokenizer, FACTS[:2], hparams, state=trial_state)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        outcome = before_or_after(trial_model, trial_state, before, before_state, after, after_state)
        assert outcome != "corrupted", f"interrupted at line event {point} of {total}"
        outcomes.append(outcome)
    assert "before" in outcomes and "after" in outcomes


# ---------------------------------------------------------------------------
# 2. The editor owns the modes it needs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "no_grad", "inference_mode"])
def test_the_callers_modes_do_not_change_the_edit_and_come_back(setting, tokenizer, mode):
    model, state, hparams, after, after_state = setting
    if mode == "train":
        model.train()
        apply_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
        assert model.training and all(m.training for m in model.modules())
    else:
        context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with context:
            apply_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
            assert not torch.is_grad_enabled()
        assert torch.is_grad_enabled()
    current = model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in after.items()), "not the eval-mode edit, bit for bit"
    assert same_state(state, after_state)


# ---------------------------------------------------------------------------
# 3. Threads
# ---------------------------------------------------------------------------
def test_two_threads_editing_one_model_are_serialised(tmp_path, tokenizer):
    hparams = exact_hparams(tmp_path, "llama", v_num_grad_steps=4)
    base = BUILDERS["llama"]()
    base_state = create_state(base, tokenizer, hparams)
    orders = {}
    for order in ((0, 1), (1, 0)):
        model, state = copy.deepcopy(base), copy.deepcopy(base_state)
        for i in order:
            apply_to_model(model, tokenizer, [FACTS[i]], hparams, state=state)
        orders[order] = weights_snapshot(model)
    model, state = copy.deepcopy(base), copy.deepcopy(base_state)
    errors = []

    def edit(i):
        try:
            apply_to_model(model, tokenizer, [FACTS[i]], hparams, state=state)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=edit, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and state.edits_applied == 2
    current = model.state_dict()
    assert any(all(torch.equal(current[k], v) for k, v in snapshot.items()) for snapshot in orders.values()), \
        "the weights are neither order's: the two edits interleaved"


# ---------------------------------------------------------------------------
# 4. Hparams checked at every edit, and at construction
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("L2", 0.0), ("v_num_grad_steps", 0), ("v_lr", float("inf")),
                                          ("nullspace_threshold", float("nan"))])
def test_hparams_changed_after_loading_are_refused_at_the_edit(setting, tokenizer, field, value):
    model, state, hparams, _, _ = setting
    setattr(hparams, field, value)
    snapshot, summary = weights_snapshot(model), state_summary(state)
    with pytest.raises(ValueError, match=field):
        apply_alphaedit_to_model(model, tokenizer, FACTS[:1], hparams, state=state)
    assert_weights_unchanged(model, snapshot)
    assert same_state(state, summary)


@pytest.mark.parametrize("field, value", [("L2", float("inf")), ("v_lr", float("inf")), ("v_weight_decay", float("inf")),
                                          ("clamp_norm_factor", float("nan")), ("mom2_update_weight", float("inf")),
                                          ("seed", "zero"), ("seed", 1.5), ("stats_dir", 5), ("device", -1),
                                          ("fp16", "yes"), ("max_length", 0)])
def test_non_finite_and_mistyped_fields_are_refused_at_construction(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        AlphaEditHyperParams(layers=[1], **{field: value})


def test_hparams_given_as_a_dict_say_which_class_is_expected(setting, tokenizer):
    model, state, hparams, _, _ = setting
    with pytest.raises(TypeError, match="hparams must be an object of a registered method's hparams class"):
        apply_to_model(model, tokenizer, FACTS[:1], hparams.to_dict(), state=state)
    with pytest.raises(TypeError, match="needs alphaedit_plugin.AlphaEditHyperParams, got builtins.dict"):
        apply_alphaedit_to_model(model, tokenizer, FACTS[:1], hparams.to_dict(), state=state)


# ---------------------------------------------------------------------------
# 5. A state belongs to weights, not to a name
# ---------------------------------------------------------------------------
def test_a_state_of_another_checkpoint_with_the_same_name_is_refused(setting, tokenizer):
    model, state, hparams, _, _ = setting
    other = BUILDERS["llama"](seed=1)  # the same name (hparams.model_name), other weights
    snapshot = weights_snapshot(other)
    with pytest.raises(StateMismatchError, match="unedited_weights.*another checkpoint"):
        apply_to_model(other, tokenizer, FACTS[:1], hparams, state=state)
    assert_weights_unchanged(other, snapshot)
    apply_to_model(model, tokenizer, FACTS[:1], hparams, state=state)  # its own model, after an edit: accepted
    apply_to_model(model, tokenizer, FACTS[1:2], hparams, state=state)


def test_a_wider_models_state_gets_a_clear_error(setting, tokenizer):
    _, state, hparams, _, _ = setting
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=len(make_tokenizer()), hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=1, tie_word_embeddings=False)).eval()
    with pytest.raises(StateMismatchError, match="different setting"):
        apply_to_model(wider, tokenizer, FACTS[:1], hparams, state=state)


# ---------------------------------------------------------------------------
# 6. Honest outcomes
# ---------------------------------------------------------------------------
def test_the_log_keeps_what_the_written_edit_achieves(tmp_path, tokenizer):
    model = BUILDERS["llama"]()
    hparams = exact_hparams(tmp_path, "llama")
    state = create_state(model, tokenizer, hparams)
    apply_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
    record = state.edit_log[-1]
    assert len(record.achieved_probability) == 2 and all(0 < p <= 1 for p in record.achieved_probability)
    assert record.not_taken == [], record.not_taken


def test_an_edit_that_did_not_take_is_named_with_its_reason(tmp_path, tokenizer, caplog):
    """A null space of one direction (a threshold just above the smallest eigenvalue of full-rank statistics)."""
    from alphaedit_plugin.layer_statistics import load_second_moments

    model = BUILDERS["llama"]()
    hparams = make_hparams(tmp_path, "llama", n_lines=40, mom2_dtype="float64", mom2_heldout_fraction=0.0)
    moments = load_second_moments(model, tokenizer, hparams, edit_loop.validate_setup(model, hparams))
    smallest = max(float(torch.linalg.eigvalsh(m)[0]) for m in moments.values())
    second = min(float(torch.linalg.eigvalsh(m)[1]) for m in moments.values())
    hparams.nullspace_threshold = (smallest * second) ** 0.5 if smallest < second else smallest * 1.001
    state = create_state(model, tokenizer, hparams)
    assert min(s.rank for s in state.null_spaces.values()) <= 2
    with caplog.at_level(logging.WARNING, logger="alphaedit_plugin.edit_loop"):
        apply_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
    record = state.edit_log[-1]
    assert record.not_taken, (record.achieved_probability, record.target_probability)
    first = record.not_taken[0]
    assert first["achieved"] < 0.5 * first["searched"] and "null space (rank" in first["why"]
    assert "did not take" in caplog.text and repr(first["prompt"]) in caplog.text


# ---------------------------------------------------------------------------
# 7. Clear errors before any statistics or search
# ---------------------------------------------------------------------------
def refused_before_statistics(tmp_path, model, tok, requests, hparams, error, match):
    snapshot = weights_snapshot(model)
    with pytest.raises(error, match=match):
        apply_to_model(model, tok, requests, hparams)
    assert_weights_unchanged(model, snapshot)
    assert not Path(hparams.stats_dir).exists(), "statistics were computed before the error"


def test_a_rewrite_module_that_does_not_write_the_hidden_state(tmp_path, tokenizer):
    hparams = exact_hparams(tmp_path, "gpt2", rewrite_module_tmp="transformer.h.{}.mlp.c_fc")
    refused_before_statistics(tmp_path, BUILDERS["gpt2"](), tokenizer, FACTS[:1], hparams, ValueError,
                              "names a module with 128 outputs .* must write the block's hidden state \\(32 outputs\\)")


def test_a_prompt_longer_than_the_positions_names_the_request(tmp_path, tokenizer):
    long_prompt = " ".join(["the"] * 70) + " France"
    requests = [FACTS[0], {"prompt": long_prompt, "subject": "France", "target_new": "Rome"}]
    refused_before_statistics(tmp_path, BUILDERS["gpt2"](), tokenizer, requests, exact_hparams(tmp_path, "gpt2"),
                              RequestError, "request 1: .* the model has 64 positions")


def test_a_context_template_length_beyond_the_positions(tmp_path, tokenizer):
    hparams = exact_hparams(tmp_path, "gpt2", context_template_length=60)
    with pytest.raises((ValueError, RequestError), match="context_template_length"):
        apply_to_model(BUILDERS["gpt2"](), tokenizer, FACTS[:1], hparams)


def test_corpus_texts_beyond_the_positions_are_cut_with_a_note(tmp_path, tokenizer, caplog):
    corpus = tmp_path / "long.txt"
    corpus.write_text("\n".join(" ".join(["the", "city", "of", "Paris", "is", "in", "France"] * 20)
                                for _ in range(6)) + "\n")
    hparams = exact_hparams(tmp_path, "gpt2", mom2_dataset=str(corpus), mom2_max_tokens=500)
    with caplog.at_level(logging.INFO, logger="alphaedit_plugin.corpus"):
        create_state(BUILDERS["gpt2"](), tokenizer, hparams)
    assert "corpus texts are cut at 64 tokens" in caplog.text


@pytest.mark.parametrize("content, match", [
    (b"The city of Paris is located in France and it is big.\n\xff\xfe broken\n", "line 2 is not UTF-8"),
    (b'{"text": "The city of Paris is located in France and it is big."}\n{"text": broken}\n',
     "line 2 is not valid JSON"),
    (b'{"text": "The city of Paris is located in France and it is big."}\n{"words": "no text"}\n',
     "line 2 has no string 'text' field"),
])
def test_a_corpus_file_that_is_not_text_or_jsonl_names_the_file_and_line(tmp_path, tokenizer, content, match):
    suffix = ".jsonl" if content.startswith(b"{") else ".txt"
    corpus = tmp_path / f"corpus{suffix}"
    corpus.write_bytes(content)
    hparams = exact_hparams(tmp_path, "gpt2", mom2_dataset=str(corpus))
    model = BUILDERS["gpt2"]()
    snapshot = weights_snapshot(model)
    with pytest.raises(CorpusError, match=f"{corpus.name}: {match}"):
        apply_to_model(model, tokenizer, FACTS[:1], hparams)
    assert_weights_unchanged(model, snapshot)


def test_one_batch_asking_one_prompt_for_two_targets(tmp_path, tokenizer):
    requests = [FACTS[0], {**FACTS[1]}, {**FACTS[0], "target_new": "Berlin"}]
    refused_before_statistics(tmp_path, BUILDERS["llama"](), tokenizer, requests, exact_hparams(tmp_path, "llama"),
                              RequestError, "requests 0 and 2 ask the same prompt .* 'Rome' and 'Berlin'")


def test_a_loss_layer_below_the_last_edited_layer(tmp_path, tokenizer):
    hparams = exact_hparams(tmp_path, "llama", v_loss_layer=1)
    refused_before_statistics(tmp_path, BUILDERS["llama"](), tokenizer, FACTS[:1], hparams, ValueError,
                              "v_loss_layer 1 .* is below the last edited layer 2")
