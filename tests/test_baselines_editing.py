"""MEMIT, PRUNE and RECT with and without P on tiny random GPT-2 and Llama models."""

import pytest
import torch
from conftest import (BUILDERS, FACTS, assert_weights_unchanged, corpus_texts, make_hparams, module_inputs,
                      weights_snapshot, write_corpus)

from alphaedit_plugin import (AlphaEditHyperParams, DeltaError, EditError, MEMITHyperParams, PRUNEHyperParams,
                              ProjectorMismatchError, RECTHyperParams, StateMismatchError, apply_alphaedit_to_model,
                              apply_to_model, compute_update, create_state, edit_loop, normalise_requests)
from alphaedit_plugin.architectures import get_module, templates_for, weight_as_out_in
from alphaedit_plugin.layer_statistics import load_second_moments
from alphaedit_plugin.methods.delta_projection import apply_with_delta_projection
from alphaedit_plugin.methods.memit import MEMIT
from alphaedit_plugin.methods.prune import largest_sv, restrain_singular_values

CLASSES = {"MEMIT": MEMITHyperParams, "PRUNE": PRUNEHyperParams, "RECT": RECTHyperParams}
SHARED = ("layers", "v_num_grad_steps", "v_lr", "clamp_norm_factor", "v_weight_decay", "L2", "nullspace_threshold",
          "mom2_dataset", "mom2_n_samples", "stats_dir", "context_template_count", "context_template_length",
          "model_name", "mom2_dtype", "mom2_heldout_fraction")


def baseline_hparams(tmp_path, arch, method, projection, **overrides):
    """Exact null space: P from a 4-line corpus (rank-deficient K0K0ᵀ, float64); λ small for the tiny models."""
    base = make_hparams(tmp_path, arch, n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0)
    fields = {name: getattr(base, name) for name in SHARED}
    fields.update(projection=projection, mom2_update_weight=1.0)
    fields.update(overrides)
    return CLASSES[method](**fields)


def make_state(model, tok, hparams, tmp_path):
    """The state, with MEMIT's C0 from a broader 40-line corpus: the 4-line one is singular, which MEMIT cannot solve."""
    state = create_state(model, tok, hparams)
    broad = type(hparams)(**{**{n: getattr(hparams, n) for n in SHARED},
                             "mom2_dataset": write_corpus(tmp_path / "broad.txt", 40)})
    state.second_moments = load_second_moments(model, tok, broad, templates_for(model, broad))
    return state


def layer_weights(model, hparams):
    templates = templates_for(model, hparams)
    return {l: weight_as_out_in(get_module(model, templates.rewrite_module_tmp.format(l))).detach().clone()
            for l in hparams.layers}


def preservation(arch, tok, hparams, before, after):
    """‖ΔW·K0‖/‖W·K0‖ per layer on every token of the statistics corpus (keys read on the unedited model)."""
    reference = BUILDERS[arch]()
    templates = templates_for(reference, hparams)
    texts = corpus_texts(hparams.mom2_dataset)
    result = {}
    for layer in hparams.layers:
        k0 = torch.cat(module_inputs(reference, tok, templates.rewrite_module_tmp.format(layer), texts)).double()
        delta = (after[layer] - before[layer]).double()
        result[layer] = float((k0 @ delta.T).norm() / (k0 @ before[layer].double().T).norm())
    return result


def preservation_with_and_without_p(tmp_path, arch, tokenizer, method, **overrides):
    """{projection: per-layer ‖ΔW·K0‖/‖W·K0‖} after editing FACTS into a fresh model with each variant."""
    ratios = {}
    for projection in (False, True):
        model = BUILDERS[arch]()
        hparams = baseline_hparams(tmp_path, arch, method, projection, **overrides)
        state = make_state(model, tokenizer, hparams, tmp_path)
        before = layer_weights(model, hparams)
        apply_to_model(model, tokenizer, FACTS, hparams, state=state)
        after = layer_weights(model, hparams)
        assert all((after[l] - before[l]).norm() > 0 for l in hparams.layers)
        ratios[projection] = preservation(arch, tokenizer, hparams, before, after)
    return ratios


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_projected_variant_preserves_k0_and_unprojected_does_not(tmp_path, arch, tokenizer, method):
    ratios = preservation_with_and_without_p(tmp_path, arch, tokenizer, method)
    assert max(ratios[True].values()) < 1e-5, ratios
    assert min(ratios[False].values()) > 1e-2, ratios


def test_unprojected_memit_reproduces_the_memit_closed_form(tmp_path, arch, tokenizer, monkeypatch):
    model = BUILDERS[arch]()
    hparams = baseline_hparams(tmp_path, arch, "MEMIT", False, mom2_update_weight=3.0)
    state = make_state(model, tokenizer, hparams, tmp_path)
    seen, real = {}, edit_loop.solve_layer

    def recording(method, state, layer, keys, residuals):
        delta = real(method, state, layer, keys, residuals)
        seen[layer] = (keys.double(), residuals.double(), delta.double())
        return delta

    monkeypatch.setattr(edit_loop, "solve_layer", recording)
    update = compute_update(model, tokenizer, normalise_requests(FACTS), hparams, state)
    for layer, (k1, r, delta) in seen.items():
        c0 = state.second_moments[layer]
        expected = r @ k1.T @ torch.linalg.inv(3.0 * c0 + k1 @ k1.T)  # MEMIT Eq. 14, λ = mom2_update_weight
        assert torch.allclose(delta, expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(update.deltas[layer], delta.float())


@pytest.mark.parametrize("method", ["PRUNE", "RECT"])
def test_unprojected_variants_start_from_memits_update(tmp_path, tokenizer, method, monkeypatch):
    """The solved update of PRUNE and RECT is MEMIT's; what differs is only their own step on it."""
    arch = "llama"
    # PRUNE with a restraint threshold above every update's size (F is the identity); RECT keeping every entry.
    monkeypatch.setattr("alphaedit_plugin.methods.prune.method.largest_sv", lambda weight: 1e9)
    results = {}
    for name in ("MEMIT", method):
        model = BUILDERS[arch]()
        hparams = baseline_hparams(tmp_path, arch, name, False,
                                   **({"rect_top_fraction": 1.0} if name == "RECT" else {}))
        state = make_state(model, tokenizer, hparams, tmp_path)
        before = layer_weights(model, hparams)
        apply_to_model(model, tokenizer, FACTS, hparams, state=state)
        after = layer_weights(model, hparams)
        results[name] = {l: after[l] - before[l] for l in hparams.layers}
    for layer, delta in results["MEMIT"].items():
        assert torch.allclose(results[method][layer], delta, atol=1e-6 * delta.abs().max().item() + 1e-7)


def test_prune_restrains_the_accumulated_update(tmp_path, tokenizer):
    arch = "gpt2"
    model = BUILDERS[arch]()
    hparams = baseline_hparams(tmp_path, arch, "PRUNE", False)
    state = make_state(model, tokenizer, hparams, tmp_path)
    original = layer_weights(model, hparams)
    for fact in FACTS:  # sequential: one fact per call
        apply_to_model(model, tokenizer, [fact], hparams, state=state)
    after = layer_weights(model, hparams)
    restrained_any = False
    for layer in hparams.layers:
        bar = largest_sv(original[layer])
        raw = state.running_sums["raw_totals"][layer]
        applied = (after[layer] - original[layer]).double()
        assert torch.allclose(applied, restrain_singular_values(raw, bar), atol=1e-5)
        raw_sv, applied_sv = torch.linalg.svdvals(raw), torch.linalg.svdvals(applied)
        assert applied_sv[0] <= bar + torch.log(raw_sv[0] / bar).clamp_min(0) + 1e-4
        small = raw_sv < bar
        assert torch.allclose(applied_sv[small], raw_sv[small], atol=1e-5)  # small directions untouched
        restrained_any |= bool(raw_sv[0] > bar)
    assert restrained_any, "the test's edits should be large enough to trigger the restraint"


@pytest.mark.parametrize("projection", [False, True])
def test_rect_sparsity(tmp_path, tokenizer, projection):
    arch = "llama"
    model = BUILDERS[arch]()
    order = "project_then_sparsify" if projection else "sparsify_then_project"
    hparams = baseline_hparams(tmp_path, arch, "RECT", projection, rect_top_fraction=0.4, rect_projection_order=order)
    state = make_state(model, tokenizer, hparams, tmp_path)
    before = layer_weights(model, hparams)
    apply_to_model(model, tokenizer, FACTS, hparams, state=state)
    after = layer_weights(model, hparams)
    for layer in hparams.layers:
        delta = after[layer] - before[layer]
        nonzero = int((delta != 0).sum())
        assert 0 < nonzero <= -(-0.4 * delta.numel() // 1)  # at most ceil(40%) of the entries are written


def test_rect_projected_default_order_is_in_null_space_but_dense(tmp_path, tokenizer):
    arch = "gpt2"
    model = BUILDERS[arch]()
    hparams = baseline_hparams(tmp_path, arch, "RECT", True)
    state = make_state(model, tokenizer, hparams, tmp_path)
    before = layer_weights(model, hparams)
    apply_to_model(model, tokenizer, FACTS, hparams, state=state)
    after = layer_weights(model, hparams)
    assert max(preservation(arch, tokenizer, hparams, before, after).values()) < 1e-5
    for layer in hparams.layers:
        p = state.null_spaces[layer].projector.double()
        delta = (after[layer] - before[layer]).double()
        assert torch.allclose(delta @ p, delta, atol=1e-5)


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_sequential_use_keeps_earlier_edits(tmp_path, tokenizer, method):
    arch = "llama"
    model = BUILDERS[arch]()
    hparams = baseline_hparams(tmp_path, arch, method, True, v_num_grad_steps=25)
    state = make_state(model, tokenizer, hparams, tmp_path)

    def prefers_new(fact):
        from alphaedit_plugin.evaluation.scoring import answer_nll
        new, true = answer_nll(model, tokenizer, [(fact["prompt"], fact["target_new"]), (fact["prompt"], "the")])
        return new < true

    apply_to_model(model, tokenizer, FACTS[:1], hparams, state=state)
    assert prefers_new(FACTS[0])
    kp_after_first = {l: v.clone() for l, v in state.earlier_keys_kkt_sum.items()}
    assert all(v.abs().sum() > 0 for v in kp_after_first.values())  # Kp Kpᵀ carried
    apply_to_model(model, tokenizer, FACTS[1:], hparams, state=state)
    assert prefers_new(FACTS[0]), "the first edit was lost after the second batch"
    assert state.edits_applied == 3


def test_unprojected_memit_records_but_does_not_use_earlier_keys(tmp_path, tokenizer):
    """The state records every edit's keys; MEMIT's solve has no Kp Kpᵀ term, so they do not change its update."""
    model = BUILDERS["gpt2"]()
    hparams = baseline_hparams(tmp_path, "gpt2", "MEMIT", False)
    state = make_state(model, tokenizer, hparams, tmp_path)
    requests = normalise_requests(FACTS[1:])
    fresh = compute_update(model, tokenizer, requests, hparams, state)
    apply_to_model(model, tokenizer, FACTS[:1], hparams, state=state)
    assert all(v.abs().sum() > 0 for v in state.earlier_keys_kkt_sum.values())
    tampered = {layer: 1e6 * torch.eye(v.shape[0]) for layer, v in state.earlier_keys_kkt_sum.items()}
    model_after_first = BUILDERS["gpt2"]()
    model_after_first.load_state_dict(model.state_dict())
    state.earlier_keys_kkt_sum = tampered
    with_tampered = compute_update(model_after_first, tokenizer, requests, hparams, state)
    state.earlier_keys_kkt_sum = {layer: torch.zeros_like(v) for layer, v in tampered.items()}
    with_zero = compute_update(model_after_first, tokenizer, requests, hparams, state)
    for layer in hparams.layers:
        assert torch.equal(with_tampered.deltas[layer], with_zero.deltas[layer])
        assert not torch.equal(fresh.deltas[layer], with_zero.deltas[layer])  # the first edit changed the model


# ---- bad input -----------------------------------------------------------
@pytest.mark.parametrize("bad", ["none", "shape", "nan", "missing"])
def test_a_method_with_a_bad_delta_changes_nothing(tmp_path, tokenizer, bad):
    model = BUILDERS["gpt2"]()
    hparams = baseline_hparams(tmp_path, "gpt2", "MEMIT", True)
    state = make_state(model, tokenizer, hparams, tmp_path)
    snapshot = weights_snapshot(model)
    kp = {l: v.clone() for l, v in state.earlier_keys_kkt_sum.items()}

    class Broken(MEMIT):
        def finalize(self, layer, delta, weight, state):
            return {"none": None, "shape": delta[:, :-1], "nan": delta * float("nan"), "missing": delta}[bad]

        def combine(self, deltas, weights, state):
            changes = dict(deltas)
            if bad == "missing":
                changes.pop(hparams.layers[0])
            return changes, {}

    with pytest.raises(DeltaError, match="weights unchanged"):
        apply_to_model(model, tokenizer, FACTS, hparams, state=state, method=Broken(hparams))
    assert_weights_unchanged(model, snapshot)
    assert all(torch.equal(state.earlier_keys_kkt_sum[l], kp[l]) for l in kp)
    assert state.edits_applied == 0


def test_a_state_for_another_model_or_layers_is_refused(tmp_path, tokenizer):
    model = BUILDERS["llama"]()
    hparams = baseline_hparams(tmp_path, "llama", "MEMIT", True)
    state = make_state(model, tokenizer, hparams, tmp_path)
    other_layers = baseline_hparams(tmp_path, "llama", "MEMIT", True, layers=[2, 3])
    snapshot = weights_snapshot(model)
    with pytest.raises(StateMismatchError, match="layers"):
        apply_to_model(model, tokenizer, FACTS, other_layers, state=state)
    gpt2 = BUILDERS["gpt2"]()
    with pytest.raises(StateMismatchError):
        apply_to_model(gpt2, tokenizer, FACTS, baseline_hparams(tmp_path, "gpt2", "MEMIT", True), state=state)
    other_method = baseline_hparams(tmp_path, "llama", "PRUNE", True)
    with pytest.raises(StateMismatchError, match="method"):
        apply_to_model(model, tokenizer, FACTS, other_method, state=state)
    assert_weights_unchanged(model, snapshot)


def test_a_projector_of_the_wrong_size_is_refused(tmp_path, tokenizer):
    model = BUILDERS["gpt2"]()
    hparams = baseline_hparams(tmp_path, "gpt2", "MEMIT", True)
    state = make_state(model, tokenizer, hparams, tmp_path)
    layer = hparams.layers[0]
    state.null_spaces[layer].projector = torch.eye(7)
    snapshot = weights_snapshot(model)
    with pytest.raises(EditError, match="another model or module"):
        apply_to_model(model, tokenizer, FACTS, hparams, state=state)
    assert_weights_unchanged(model, snapshot)


def test_hparams_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="alg_name must be 'PRUNE'"):
        PRUNEHyperParams(layers=[1], alg_name="MEMIT")
    with pytest.raises(ValueError, match="rect_top_fraction"):
        RECTHyperParams(layers=[1], rect_top_fraction=0.0)
    with pytest.raises(ValueError, match="rect_projection_order"):
        RECTHyperParams(layers=[1], rect_projection_order="sideways")
    with pytest.raises(ValueError, match="prune_log_base"):
        PRUNEHyperParams(layers=[1], prune_log_base=1.0)
    with pytest.raises(ValueError, match="projection"):
        MEMITHyperParams(layers=[1], projection="yes")
    with pytest.raises(ValueError, match="mom2_update_weight"):
        MEMITHyperParams(layers=[1], mom2_update_weight=-1)


# ---- the generic fallback --------------------------------------------------
def test_fallback_projects_another_editors_delta(tmp_path, arch, tokenizer):
    """Wrap an editor whose solve cannot take P (here: the unprojected MEMIT apply function)."""
    model = BUILDERS[arch]()
    hparams = baseline_hparams(tmp_path, arch, "MEMIT", False)
    inner_state = make_state(model, tokenizer, hparams, tmp_path)
    projectors = create_state(model, tokenizer, make_hparams(tmp_path, arch, n_lines=4, mom2_dtype="float64",
                                                             mom2_heldout_fraction=0.0))
    templates = templates_for(model, hparams)
    before = layer_weights(model, hparams)

    def editor(model, tok, requests, hp, **kwargs):
        return apply_to_model(model, tok, requests, hp, state=inner_state, **kwargs)

    _, weights_copy = apply_with_delta_projection(editor, model, tokenizer, FACTS, hparams, projectors,
                                                  hparams.layers, templates.rewrite_module_tmp)
    after = layer_weights(model, hparams)
    assert set(weights_copy) == {f"{templates.rewrite_module_tmp.format(l)}.weight" for l in hparams.layers}
    assert max(preservation(arch, tokenizer, hparams, before, after).values()) < 1e-5
    assert all((after[l] - before[l]).norm() > 0 for l in hparams.layers)


@pytest.mark.parametrize("bad", ["nothing", "outside", "shape"])
def test_fallback_refuses_a_bad_editor_and_restores(tmp_path, tokenizer, bad):
    model = BUILDERS["gpt2"]()
    hparams = make_hparams(tmp_path, "gpt2", n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0)
    projectors = create_state(model, tokenizer, hparams)
    templates = templates_for(model, hparams)
    snapshot = weights_snapshot(model)

    def editor(model, tok, requests, hp, **kwargs):
        copy = {}
        if bad == "outside":
            name = "transformer.h.0.attn.c_attn.weight"
            param = dict(model.named_parameters())[name]
            copy[name] = param.detach().clone()
            with torch.no_grad():
                param.add_(1.0)
        if bad == "shape":
            module = model.get_submodule(templates.rewrite_module_tmp.format(hparams.layers[0]))
            copy[templates.rewrite_module_tmp.format(hparams.layers[0]) + ".weight"] = module.weight.detach().clone()
            module.weight = torch.nn.Parameter(torch.zeros(3, 3))
        return model, copy

    with pytest.raises(DeltaError, match="weights unchanged"):
        apply_with_delta_projection(editor, model, tokenizer, FACTS, hparams, projectors, hparams.layers,
                                    templates.rewrite_module_tmp)
    assert_weights_unchanged(model, snapshot)


def test_fallback_refuses_projectors_of_another_model(tmp_path, tokenizer):
    llama = BUILDERS["llama"]()
    projectors = create_state(llama, tokenizer, make_hparams(tmp_path, "llama", n_lines=4, mom2_dtype="float64",
                                                             mom2_heldout_fraction=0.0))
    gpt2 = BUILDERS["gpt2"]()
    templates = templates_for(gpt2, make_hparams(tmp_path, "gpt2"))
    with pytest.raises(ProjectorMismatchError, match="another model"):
        apply_with_delta_projection(lambda *a, **k: (gpt2, {}), gpt2, tokenizer, FACTS, None, projectors, [1, 2],
                                    templates.rewrite_module_tmp)


def test_memit_plus_p_is_alphaedit_and_keeping_lambda_c0_changes_it(tmp_path, arch, tokenizer):
    """The paper's one-line change turns MEMIT into AlphaEdit: same keys, targets and solve, sequentially too.

    ``projection_keeps_mom2_term: true`` (P and λ·C0 together) gives a different, smaller update.
    """
    facts = [FACTS[:2], FACTS[2:]]
    alpha_model = BUILDERS[arch]()
    memit_hparams = baseline_hparams(tmp_path, arch, "MEMIT", True, mom2_update_weight=50.0)
    alpha_hparams = AlphaEditHyperParams(**{n: getattr(memit_hparams, n) for n in SHARED})
    alpha_state = create_state(alpha_model, tokenizer, alpha_hparams)
    before = layer_weights(alpha_model, alpha_hparams)
    for batch in facts:
        apply_alphaedit_to_model(alpha_model, tokenizer, batch, alpha_hparams, state=alpha_state)
    alpha_delta = {l: w - before[l] for l, w in layer_weights(alpha_model, alpha_hparams).items()}

    deltas = {}
    for keep in (False, True):
        model = BUILDERS[arch]()
        hparams = baseline_hparams(tmp_path, arch, "MEMIT", True, mom2_update_weight=50.0,
                                   projection_keeps_mom2_term=keep)
        assert hparams.label == ("MEMIT+P+λC0" if keep else "MEMIT+P")
        state = make_state(model, tokenizer, hparams, tmp_path)
        for batch in facts:
            apply_to_model(model, tokenizer, batch, hparams, state=state)
        deltas[keep] = {l: w - before[l] for l, w in layer_weights(model, hparams).items()}
    for layer, expected in alpha_delta.items():
        assert expected.norm() > 0
        torch.testing.assert_close(deltas[False][layer], expected, rtol=1e-4, atol=1e-6)
        assert (deltas[True][layer] - expected).norm() > 1e-3 * expected.norm()
