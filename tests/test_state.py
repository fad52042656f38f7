"""The one editing state: commit and undo_last are exact, a failed edit changes nothing in it, and files written by
the earlier AlphaEditState.save / BaselineState.save (format 1) still load and carry on where they stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BUILDERS, FACTS, assert_matches_recording, exact_hparams, make_hparams, make_tokenizer

from alphaedit_plugin import (AlphaEditHyperParams, EditingState, PRUNEHyperParams, StateMismatchError,
                              apply_to_model, create_state, state_identity)
from alphaedit_plugin.architectures import templates_for

LEGACY = Path(__file__).parent / "fixtures" / "legacy_states"
SHARED = ("layers", "v_num_grad_steps", "v_lr", "clamp_norm_factor", "v_weight_decay", "L2", "nullspace_threshold",
          "mom2_n_samples", "context_template_count", "context_template_length", "mom2_dtype",
          "mom2_heldout_fraction", "mom2_dataset")


def legacy_setting(tmp_path, name):
    """The hparams the format-1 files in fixtures/legacy_states were made with (tests/fixtures README)."""
    base = make_hparams(tmp_path, "llama", n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0,
                        model_name="tiny-llama")
    fields = {k: getattr(base, k) for k in SHARED}
    fields.update(model_name="tiny-llama", stats_dir=str(tmp_path / "cache"))
    if name == "AlphaEdit":
        return AlphaEditHyperParams(**fields)
    return PRUNEHyperParams(**fields, projection=True, mom2_update_weight=2.0, prune_log_base=1.5)


def down_proj(model, layer):
    return model.get_submodule(f"model.layers.{layer}.mlp.down_proj").weight.detach().clone()


@pytest.mark.parametrize("name, file", [("AlphaEdit", "alphaedit_state_format1.pt"),
                                        ("PRUNE+P", "prune_p_state_format1.pt")])
def test_a_format_1_state_loads_and_carries_on_as_before(tmp_path, name, file):
    from safetensors.torch import load_file

    tok = make_tokenizer()
    hparams = legacy_setting(tmp_path, name)
    model = BUILDERS["llama"]()
    apply_to_model(model, tok, FACTS[:1], hparams, state=create_state(model, tok, hparams))  # the first edit again
    identity = state_identity(model, hparams, templates_for(model, hparams))
    state = EditingState.load(LEGACY / file, expected_identity=identity)
    assert state.method == name and state.edits_applied == 1
    assert all(float(v.abs().max()) > 0 for v in state.earlier_keys_kkt_sum.values())
    if name == "PRUNE+P":
        assert set(state.running_sums["raw_totals"]) == set(hparams.layers)
    before = {layer: down_proj(model, layer) for layer in hparams.layers}
    apply_to_model(model, tok, FACTS[1:], hparams, state=state)
    recorded = load_file(str(LEGACY / "second_edit_updates.safetensors"))
    for layer in hparams.layers:
        expected = recorded[f"{name}/second_edit/layer{layer}"]
        assert_matches_recording(down_proj(model, layer) - before[layer], expected)
    assert state.edits_applied == 3

    state.save(tmp_path / "now.pt")  # written again in today's format, read back the same
    again = EditingState.load(tmp_path / "now.pt", expected_identity=identity)
    assert again.edits_applied == 3 and torch.equal(again.earlier_keys_kkt_sum[1], state.earlier_keys_kkt_sum[1])


def test_a_state_file_for_another_setting_or_of_an_unknown_format_is_refused(tmp_path):
    hparams = legacy_setting(tmp_path, "AlphaEdit")
    model = BUILDERS["llama"]()
    other = state_identity(model, exact_hparams(tmp_path, "llama", model_name="another"), templates_for(model, hparams))
    with pytest.raises(StateMismatchError, match="model: state has 'tiny-llama'"):
        EditingState.load(LEGACY / "alphaedit_state_format1.pt", expected_identity=other)
    torch.save({"format": 1, "identity": {}}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="not an editing state file of format 3 .*holds format 1"):
        EditingState.load(tmp_path / "broken.pt")
    data = torch.load(LEGACY / "alphaedit_state_format1.pt", weights_only=True)
    del data["previous_keys_cov"]
    torch.save(data, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match="no entry \\['previous_keys_cov'\\]"):
        EditingState.load(tmp_path / "incomplete.pt")


@pytest.mark.parametrize("method", ["AlphaEdit", "PRUNE+P"])
def test_undo_last_takes_exactly_the_last_commit_out(tmp_path, method):
    tok = make_tokenizer()
    hparams = legacy_setting(tmp_path, method)
    model = BUILDERS["llama"]()
    state = create_state(model, tok, hparams)
    apply_to_model(model, tok, FACTS[:1], hparams, state=state)
    kept = {layer: value.clone() for layer, value in state.earlier_keys_kkt_sum.items()}
    totals = {name: {l: v.clone() for l, v in group.items()} for name, group in state.running_sums.items()}
    apply_to_model(model, tok, FACTS[1:], hparams, state=state)
    assert state.edits_applied == 3
    assert state.undo_last() is True
    assert state.edits_applied == 1 and len(state.edit_log) == 1
    assert all(torch.equal(state.earlier_keys_kkt_sum[l], kept[l]) for l in kept)
    assert all(torch.equal(state.running_sums[n][l], totals[n][l]) for n in totals for l in totals[n])
    assert state.undo_last() is False  # one level
    state.reset()
    assert state.edits_applied == 0 and all(float(v.abs().max()) == 0 for v in state.earlier_keys_kkt_sum.values())
