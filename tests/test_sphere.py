"""SPHERE: AlphaEdit's solve, then the soft projection Δ (I − α U Uᵀ) where the update is written."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import BUILDERS, FACTS, HOST_SOURCE, exact_hparams, needs_host

from alphaedit_plugin import AlphaEditHyperParams, compute_update, create_state, load_hparams, normalise_requests
from alphaedit_plugin.architectures import get_module, templates_for, weight_as_out_in
from alphaedit_plugin.edit_loop import apply_update
from alphaedit_plugin.methods.sphere import SPHEREHyperParams, principal_input_directions, soft_project


def sphere_hparams(tmp_path, arch, **overrides):
    base = exact_hparams(tmp_path, arch)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(AlphaEditHyperParams) if f.name != "alg_name"}
    fields.update(overrides)
    return SPHEREHyperParams(**fields)


# ---------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------
def test_full_strength_takes_away_the_update_along_the_directions_and_nothing_else():
    torch.manual_seed(0)
    weight, delta = torch.randn(24, 40), torch.randn(24, 40)
    directions = principal_input_directions(weight, 0.5)
    assert directions.shape[0] == 40 and 1 <= directions.shape[1] < 40
    assert torch.allclose(directions.T @ directions, torch.eye(directions.shape[1]), atol=1e-5)
    damped = soft_project(delta, directions, 1.0)
    assert (damped @ directions).abs().max() < 1e-5
    orthogonal = torch.randn(40, 5)
    orthogonal -= directions @ (directions.T @ orthogonal)
    assert torch.allclose(damped @ orthogonal, delta @ orthogonal, atol=1e-4)
    assert torch.equal(soft_project(delta, directions, 0.0), delta)
    half = soft_project(delta, directions, 0.5)
    assert torch.allclose(half @ directions, 0.5 * (delta @ directions), atol=1e-5)


def test_the_directions_cover_the_share_of_the_spectrum_spheres_rule_asks():
    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(30, 30))[0]
    # Rows with equal norms along a known spectrum: the Gram matrix of the unit rows is known.
    weight = torch.randn(2000, 30) * torch.tensor([3.0] * 3 + [1.0] * 27)
    weight = weight @ basis.T
    unit = weight / weight.norm(dim=1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(unit.T @ unit / unit.shape[0]).flip(0)
    for ratio in (0.1, 0.3, 0.6, 0.9):
        expected = int((torch.cumsum(eigenvalues, 0) / eigenvalues.sum() <= ratio).sum()) + 1
        assert principal_input_directions(weight, ratio).shape[1] == expected
    assert principal_input_directions(weight, 1.0).shape[1] == 30  # never more than the input width
    top = principal_input_directions(weight, 0.1)  # the 3 strong directions first
    strong = basis[:, :3]
    assert torch.linalg.matrix_norm(strong.T @ top[:, -1:]) > 0.95


@needs_host
def test_it_is_the_hosts_sparse_projection_on_a_linear_weight():
    from easyeditor.models.SPHERE.SPHERE_main import sparse_projection

    torch.manual_seed(2)
    weight, delta = torch.randn(48, 64), torch.randn(48, 64)
    host, _, _ = sparse_projection(weight, delta, eta=0.5, alpha=0.5)
    ours = soft_project(delta, principal_input_directions(weight, 0.5), 0.5)
    assert torch.allclose(ours, host, atol=1e-5)


# ---------------------------------------------------------------------------
# On the edit loop
# ---------------------------------------------------------------------------
def test_sphere_writes_alphaedits_update_damped_with_the_weight_before_the_write(tmp_path, arch, tokenizer):
    model = BUILDERS[arch]()
    hparams = sphere_hparams(tmp_path, arch, suppression_strength=0.8)
    alphaedit = exact_hparams(tmp_path, arch)
    templates = templates_for(model, hparams)
    requests = normalise_requests(FACTS)
    state, plain_state = create_state(model, tokenizer, hparams), create_state(model, tokenizer, alphaedit)
    update = compute_update(model, tokenizer, requests, hparams, state)
    plain = compute_update(model, tokenizer, requests, alphaedit, plain_state)
    modules = {l: get_module(model, templates.rewrite_module_tmp.format(l)) for l in hparams.layers}
    before = {l: weight_as_out_in(m).detach().clone() for l, m in modules.items()}
    apply_update(model, requests, hparams, state, update)
    for layer in hparams.layers:
        assert torch.equal(update.deltas[layer], plain.deltas[layer])  # the solve is AlphaEdit's
        expected = soft_project(update.deltas[layer], principal_input_directions(before[layer], 0.5), 0.8)
        written = weight_as_out_in(modules[layer]).detach() - before[layer]
        assert torch.allclose(written, expected, atol=1e-5 * expected.abs().max().item()), layer
        assert not torch.allclose(written, update.deltas[layer], atol=1e-3 * expected.abs().max().item())
    assert state.edits_applied == len(FACTS)
    for layer in hparams.layers:  # the keys go into Kp Kpᵀ as AlphaEdit's would
        keys = update.keys[layer].double()
        assert torch.allclose(state.earlier_keys_kkt_sum[layer].double(), keys.T @ keys, rtol=1e-4, atol=1e-5)


def test_with_either_number_zero_it_is_alphaedit(tmp_path, tokenizer):
    model = BUILDERS["llama"]()
    hparams = sphere_hparams(tmp_path, "llama", suppression_strength=0.0)
    templates = templates_for(model, hparams)
    requests = normalise_requests(FACTS)
    state = create_state(model, tokenizer, hparams)
    update = compute_update(model, tokenizer, requests, hparams, state)
    module = get_module(model, templates.rewrite_module_tmp.format(hparams.layers[0]))
    before = weight_as_out_in(module).detach().clone()
    apply_update(model, requests, hparams, state, update)
    assert torch.equal(weight_as_out_in(module).detach(), before + update.deltas[hparams.layers[0]])


@pytest.mark.parametrize("field, value", [("cumulative_ratio", 1.5), ("suppression_strength", -0.1)])
def test_out_of_range_settings_are_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a number in \\[0, 1\\]"):
        sphere_hparams(tmp_path, "llama", **{field: value}).validate()


@pytest.mark.skipif(not (HOST_SOURCE / "hparams" / "SPHERE" / "llama3-8b.yaml").is_file(),
                    reason="the EasyEdit source's hparams/SPHERE is not here")
def test_the_hosts_sphere_yaml_loads_as_it_is():
    hparams = load_hparams(HOST_SOURCE / "hparams" / "SPHERE" / "llama3-8b.yaml")
    assert isinstance(hparams, SPHEREHyperParams)
    assert (hparams.cumulative_ratio, hparams.suppression_strength) == (0.5, 0.5)
    assert hparams.layers == [4, 5, 6, 7, 8]
