"""``nullspace_rule: energy`` (AlphaEdit+energy): each layer's null space holds the same share of its keys'
energy, instead of the eigenvalues below one absolute threshold."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, FACTS, make_hparams

from alphaedit_plugin import StateMismatchError, apply_to_model, create_state
from alphaedit_plugin.bench.methods import available_methods, default_hparams_path, load_method_hparams
from alphaedit_plugin.architectures import templates_for
from alphaedit_plugin.layer_statistics import load_second_moments
from alphaedit_plugin.null_space_projector import NullSpaceError, null_space_mask, null_space_projector


def test_the_null_space_is_the_smallest_directions_within_the_energy_share():
    eigenvalues = torch.tensor([0.001, 0.004, 0.015, 0.08, 0.9], dtype=torch.float64)  # trace 1.0
    assert null_space_mask(eigenvalues, 0.02, energy=0.005).tolist() == [True, True, False, False, False]
    assert null_space_mask(eigenvalues, 0.02, energy=0.02).tolist() == [True, True, True, False, False]
    assert null_space_mask(eigenvalues, 0.02).tolist() == [True, True, True, False, False]  # the threshold rule
    torch.manual_seed(0)
    keys = torch.randn(500, 40, dtype=torch.float64) * torch.logspace(-2, 1, 40, dtype=torch.float64)
    moment = keys.T @ keys / 500
    for energy in (0.01, 0.1, 0.3):
        projector = null_space_projector(moment, 2e-2, energy=energy)
        values = projector.eigenvalues
        held = float(values[:projector.rank].sum() / values.sum())
        assert held <= energy < float(values[:projector.rank + 1].sum() / values.sum())
        null_part = torch.trace(projector.matrix.double() @ moment) / torch.trace(moment)  # the same share, via P
        assert abs(float(null_part) - held) < 1e-5


def test_an_energy_share_below_the_smallest_eigenvalue_is_refused_naming_the_field():
    moment = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises(NullSpaceError, match=r"nullspace_energy 0.1 leaves no null space: the smallest eigenvalue "
                                             r"alone holds 0.167 of the trace"):
        null_space_projector(moment, 2e-2, name="layer 3", energy=0.1)


@pytest.mark.parametrize("field, value, message", [
    ("nullspace_rule", "share", r"nullspace_rule must be one of \('threshold', 'energy'\), got 'share'"),
    ("nullspace_energy", 1.0, r"nullspace_energy must be a number in \(0, 1\)")])
def test_bad_settings_are_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_hparams(tmp_path, "llama", **{field: value}).validate()


def test_the_variant_is_a_label_of_its_own_with_its_own_yaml(tmp_path):
    assert {"AlphaEdit+energy", "SPHERE+energy"} <= set(available_methods())
    path = default_hparams_path("AlphaEdit+energy", "smollm2")
    assert path.name == "smollm2-135m-energy.yaml"
    hparams = load_method_hparams("AlphaEdit+energy", str(path))
    assert hparams.label == "AlphaEdit+energy" and hparams.nullspace_energy == 0.3
    with pytest.raises(ValueError, match="AlphaEdit needs hparams with nullspace_rule: threshold"):
        load_method_hparams("AlphaEdit", str(path))


def test_each_rule_has_its_own_projectors_and_states(tmp_path, arch, tokenizer):
    model = BUILDERS[arch]()
    by_threshold = make_hparams(tmp_path, arch, nullspace_threshold=0.2)
    by_energy = make_hparams(tmp_path, arch, nullspace_threshold=0.2, nullspace_rule="energy", nullspace_energy=0.05)
    templates = templates_for(model, by_energy)
    plain, energy = create_state(model, tokenizer, by_threshold), create_state(model, tokenizer, by_energy)
    moments = load_second_moments(model, tokenizer, by_energy, templates)
    for layer in by_energy.layers:
        values = torch.linalg.eigvalsh(moments[layer]).clamp_min(0)
        rank = energy.null_spaces[layer].rank
        assert rank == int(null_space_mask(values, 0.2, 0.05).sum())  # the cached projector is the energy rule's
        assert rank != plain.null_spaces[layer].rank or not torch.equal(
            energy.null_spaces[layer].projector, plain.null_spaces[layer].projector)
    assert create_state(model, tokenizer, by_energy).null_spaces[by_energy.layers[0]].rank == \
        energy.null_spaces[by_energy.layers[0]].rank  # read back from its own cache file
    assert energy.identity["method"] == "AlphaEdit+energy" and energy.identity["nullspace_energy"] == 0.05
    assert "nullspace_energy" not in plain.identity  # states made under the paper's rule keep their identity
    with pytest.raises(StateMismatchError, match="nullspace_energy"):
        apply_to_model(model, tokenizer, FACTS, by_threshold, state=energy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_to_model(model, tokenizer, FACTS, by_energy, state=energy)
    assert energy.edits_applied == len(FACTS)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
