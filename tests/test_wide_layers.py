"""Memory design for wide layers: the factored projector, the solve that never forms P, statistics in passes
that fit a memory budget, and editing states kept in CPU memory between edits.

Each is checked against the plain dense computation on small random matrices and on the tiny GPT-2 and Llama
models: the edit must be the same whichever form P is kept in.
"""

import copy

import pytest
import torch

from conftest import BUILDERS, FACTS, corpus_texts, make_hparams, mid_spectrum_threshold, module_inputs
from alphaedit_plugin import apply_alphaedit_to_model, create_state
from alphaedit_plugin import second_moment as second_moment_module
from alphaedit_plugin.architectures import templates_for, weight_as_out_in
from alphaedit_plugin.constrained_solve import (constrained_update, memit_terms, project_rows, solve_with_terms,
                                                with_projection)
from alphaedit_plugin.edit_loop import state_device
from alphaedit_plugin.layer_statistics import load_or_compute_second_moments, statistics_keys
from alphaedit_plugin.null_space_projector import (FACTORED_FROM_WIDTH, FactoredProjector, null_space_projector,
                                                   project_both_sides, project_columns, projector_form)
from alphaedit_plugin.second_moment import layer_groups
from alphaedit_plugin.state import EditingState

D = 24


def moment_with_rank(null_rank: int, seed: int = 0) -> torch.Tensor:
    """A (D, D) second moment whose null space (eigenvalues below 1e-3) has exactly ``null_rank`` directions."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=torch.float64))
    eigenvalues = torch.cat([torch.rand(null_rank, generator=generator, dtype=torch.float64) * 1e-4,
                             1 + torch.rand(D - null_rank, generator=generator, dtype=torch.float64)])
    return (q * eigenvalues) @ q.T


@pytest.mark.parametrize("null_rank", [3, 12, 20])
def test_factored_projector_is_the_dense_one_kept_as_its_smaller_factor(null_rank):
    moment = moment_with_rank(null_rank)
    dense = null_space_projector(moment, 1e-3, form="dense")
    factored = null_space_projector(moment, 1e-3, form="factored")
    stored = factored.stored
    assert isinstance(stored, FactoredProjector)
    assert dense.rank == factored.rank == stored.rank == null_rank
    assert stored.basis.shape == (D, min(null_rank, D - null_rank))  # the smaller of the two factors
    assert stored.complement == (null_rank > D - null_rank)
    assert torch.allclose(stored.dense().double(), dense.stored.double(), atol=1e-6)
    assert torch.allclose(factored.matrix.double(), dense.matrix.double(), atol=1e-6)
    assert stored.nbytes < dense.stored.numel() * 4


@pytest.mark.parametrize("null_rank", [5, 19])
def test_factored_projector_applies_like_the_dense_matrix(null_rank):
    moment = moment_with_rank(null_rank, seed=1)
    dense = null_space_projector(moment, 1e-3, form="dense").stored.double()
    factored = null_space_projector(moment, 1e-3, form="factored").stored
    x = torch.randn(D, 7, dtype=torch.float64)
    assert torch.allclose(project_columns(factored, x), dense @ x, atol=1e-6)
    assert torch.allclose(project_rows(x.T, factored), x.T @ dense, atol=1e-6)
    assert torch.allclose(project_rows(x.T, dense), x.T @ dense, atol=1e-12)
    a = torch.randn(D, D, dtype=torch.float64)
    a = a @ a.T
    assert torch.allclose(project_both_sides(a.clone(), factored), dense @ a @ dense, atol=1e-5)
    assert torch.allclose(project_both_sides(a.clone(), dense), dense @ a @ dense, atol=1e-9)


def test_projector_form_auto_picks_factored_for_wide_layers():
    assert projector_form(576, "auto") == "dense"
    assert projector_form(FACTORED_FROM_WIDTH, "auto") == "factored"
    assert projector_form(14336, "dense") == "dense"
    assert projector_form(16, "factored") == "factored"
    with pytest.raises(ValueError, match="projector_form"):
        projector_form(16, "sparse")


def paper_update(k1, r, p, earlier, l2):
    """Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ I)⁻¹, written out as the paper has it (float64, explicit inverse)."""
    gram = k1 @ k1.T + (earlier if earlier is not None else 0)
    return r @ k1.T @ p @ torch.linalg.inv(gram @ p + l2 * torch.eye(p.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("null_rank", [6, 18])
@pytest.mark.parametrize("with_earlier", [False, True])
def test_solve_with_the_factored_projector_is_the_papers_update(null_rank, with_earlier):
    torch.manual_seed(null_rank)
    moment = moment_with_rank(null_rank, seed=2)
    dense = null_space_projector(moment, 1e-3, form="dense")
    factored = null_space_projector(moment, 1e-3, form="factored")
    k1, r = torch.randn(D, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    kp = torch.randn(D, 9, dtype=torch.float64)
    earlier = kp @ kp.T if with_earlier else None
    expected = paper_update(k1, r, dense.stored.double(), earlier, 0.5)
    for projector in (dense.stored, factored.stored):
        got = constrained_update(k1.float(), r.float(), projector, None if earlier is None else earlier.float(), 0.5)
        assert torch.allclose(got.double(), expected, rtol=1e-3, atol=1e-5)
        # The rows of Δ lie in the null space: Δ P = Δ.
        assert torch.allclose(project_rows(got.double(), projector), got.double(), atol=1e-5)


def test_solve_with_terms_is_the_same_with_either_form():
    moment = moment_with_rank(10, seed=3)
    dense = null_space_projector(moment, 1e-3, form="dense").stored
    factored = null_space_projector(moment, 1e-3, form="factored").stored
    k1, r, kp = torch.randn(D, 3), torch.randn(8, 3), torch.randn(D, 5)
    c0 = (moment / moment.norm()).float()
    for terms in (with_projection(memit_terms(2.0), ridge=0.3),
                  with_projection(memit_terms(2.0), ridge=0.3, keep_mom2_prior=True)):
        a = solve_with_terms(k1, r, terms, projector=dense, earlier_keys_kkt_sum=kp @ kp.T, second_moment=c0)
        b = solve_with_terms(k1, r, terms, projector=factored, earlier_keys_kkt_sum=kp @ kp.T, second_moment=c0)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def full_rank_hparams(tmp_path, arch, model, tok, **overrides):
    probe = make_hparams(tmp_path, arch)
    name = templates_for(model, probe).rewrite_module_tmp.format(1)
    k0 = torch.cat(module_inputs(model, tok, name, corpus_texts(probe.mom2_dataset)))
    return make_hparams(tmp_path, arch, nullspace_threshold=mid_spectrum_threshold(k0.T @ k0 / len(k0)), **overrides)


def edited_weights(model, hparams):
    template = templates_for(model, hparams).rewrite_module_tmp
    return {layer: weight_as_out_in(model.get_submodule(template.format(layer))).detach().clone()
            for layer in hparams.layers}


def test_an_edit_is_the_same_with_the_projector_dense_or_factored(tmp_path, arch, tokenizer):
    base = BUILDERS[arch]()
    results = {}
    for form in ("dense", "factored"):
        model = copy.deepcopy(base)
        hparams = full_rank_hparams(tmp_path, arch, model, tokenizer, projector_form=form)
        state = create_state(model, tokenizer, hparams)
        stored = {layer: state.null_spaces[layer].projector for layer in hparams.layers}
        assert all(isinstance(p, FactoredProjector) == (form == "factored") for p in stored.values())
        apply_alphaedit_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
        apply_alphaedit_to_model(model, tokenizer, [FACTS[2]], hparams, state=state)  # with earlier keys
        results[form] = (edited_weights(model, hparams), state)
    (dense_weights, dense_state), (factored_weights, factored_state) = results["dense"], results["factored"]
    for layer in dense_weights:
        assert dense_state.null_spaces[layer].rank == factored_state.null_spaces[layer].rank
        assert torch.allclose(dense_weights[layer], factored_weights[layer], rtol=1e-4, atol=1e-5)
        assert torch.allclose(dense_state.earlier_keys_kkt_sum[layer], factored_state.earlier_keys_kkt_sum[layer],
                              rtol=1e-4, atol=1e-4)


def test_a_state_with_factored_projectors_saves_and_loads(tmp_path, tokenizer):
    model = BUILDERS["llama"]()
    hparams = full_rank_hparams(tmp_path, "llama", model, tokenizer, projector_form="factored")
    state = create_state(model, tokenizer, hparams)
    apply_alphaedit_to_model(model, tokenizer, [FACTS[0]], hparams, state=state)
    state.save(tmp_path / "state.pt")
    loaded = EditingState.load(tmp_path / "state.pt")
    for layer in hparams.layers:
        a, b = state.null_spaces[layer].projector, loaded.null_spaces[layer].projector
        assert isinstance(b, FactoredProjector) and b.complement == a.complement
        assert torch.equal(a.basis, b.basis)
    twin = copy.deepcopy(model)
    apply_alphaedit_to_model(model, tokenizer, [FACTS[1]], hparams, state=state)
    apply_alphaedit_to_model(twin, tokenizer, [FACTS[1]], hparams, state=loaded)
    for layer, weight in edited_weights(model, hparams).items():
        assert torch.equal(weight, edited_weights(twin, hparams)[layer])


def test_the_projector_cache_keeps_each_form_apart(tmp_path, tokenizer):
    model = BUILDERS["gpt2"]()
    dense_hparams = full_rank_hparams(tmp_path, "gpt2", model, tokenizer, projector_form="dense")
    factored_hparams = full_rank_hparams(tmp_path, "gpt2", model, tokenizer, projector_form="factored")
    first = create_state(model, tokenizer, dense_hparams)
    second = create_state(model, tokenizer, factored_hparams)  # same statistics, a projector of its own form
    again = create_state(model, tokenizer, factored_hparams)  # from the cache
    for layer in dense_hparams.layers:
        assert torch.is_tensor(first.null_spaces[layer].projector)
        assert isinstance(second.null_spaces[layer].projector, FactoredProjector)
        assert torch.equal(second.null_spaces[layer].projector.basis, again.null_spaces[layer].projector.basis)
        assert torch.allclose(second.null_spaces[layer].projector.dense(), first.null_spaces[layer].projector,
                              atol=1e-5)
    projectors = list((tmp_path / "cache").rglob("projectors/*.pt"))
    assert len(projectors) == 2 * len(dense_hparams.layers)


# ---------------------------------------------------------------------------
# statistics in passes that fit a memory budget
# ---------------------------------------------------------------------------
def test_layer_groups_fit_the_budget():
    widths = {4: 100, 5: 100, 6: 100, 7: 200}
    bytes_per_layer = 100 * 100 * 4
    assert layer_groups(widths, torch.float32, 10 * bytes_per_layer) == [[4, 5, 6, 7]]
    assert layer_groups(widths, torch.float32, 2 * bytes_per_layer) == [[4, 5], [6], [7]]
    assert layer_groups(widths, torch.float64, 2 * bytes_per_layer) == [[4], [5], [6], [7]]
    assert layer_groups(widths, torch.float32, 1) == [[4], [5], [6], [7]]  # each layer alone, whatever the budget


@pytest.mark.parametrize("mom2_dtype", ["float32", "float64"])
def test_statistics_in_passes_and_device_sums_equal_the_one_pass_float64_sum(tmp_path, arch, tokenizer, monkeypatch, mom2_dtype):
    model = BUILDERS[arch]()
    one = make_hparams(tmp_path, arch, layers=[0, 1, 2], mom2_dtype=mom2_dtype, stats_dir=str(tmp_path / "one"))
    many = make_hparams(tmp_path, arch, layers=[0, 1, 2], mom2_dtype=mom2_dtype, stats_dir=str(tmp_path / "many"),
                        statistics_memory_gb=1e-9)  # each layer in a pass of its own
    templates = templates_for(model, one)
    in_one_pass = load_or_compute_second_moments(model, tokenizer, one, templates)
    passes = []
    real = second_moment_module.collect_second_moments

    def counting(*args, **kwargs):
        passes.append(sorted(kwargs["module_names"]))
        return real(*args, **kwargs)

    monkeypatch.setattr("alphaedit_plugin.layer_statistics.collect_second_moments", counting)
    # The GPU's way on the CPU: sums in the statistics dtype, flushed every few batches into float64 totals.
    monkeypatch.setattr(second_moment_module, "accumulates_on_device", lambda device: True)
    monkeypatch.setattr(second_moment_module, "FLUSH_TOKENS", 7)
    in_passes = load_or_compute_second_moments(model, tokenizer, many, templates)
    assert passes == [[0], [1], [2]]
    for layer in one.layers:
        a, b = in_one_pass[layer], in_passes[layer]
        assert a["count"] == b["count"]
        assert a["moment"].dtype == b["moment"].dtype == torch.float64
        assert torch.allclose(a["moment"], b["moment"], rtol=1e-5, atol=1e-7)
        assert torch.equal(a["heldout_keys"], b["heldout_keys"])
    assert statistics_keys(model, one, templates) == statistics_keys(model, many, templates)


# ---------------------------------------------------------------------------
# the editing state in CPU memory between edits
# ---------------------------------------------------------------------------
def test_offloaded_state_lives_on_the_cpu_and_edits_the_same(tmp_path, tokenizer):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = BUILDERS["llama"]().to(device)
    weights = {}
    for offload in (False, True):
        model = copy.deepcopy(base)
        hparams = full_rank_hparams(tmp_path, "llama", model.cpu(), tokenizer, offload_editing_state=offload,
                                    device=device)
        model.to(device)
        assert state_device(model, hparams).type == ("cpu" if offload else device)
        state = create_state(model, tokenizer, hparams)
        tensors = [state.earlier_keys_kkt_sum[l] for l in hparams.layers] + \
                  [state.null_spaces[l].projector for l in hparams.layers]
        assert {t.device.type for t in tensors} == {"cpu" if offload else device}
        apply_alphaedit_to_model(model, tokenizer, FACTS[:2], hparams, state=state)
        assert {state.earlier_keys_kkt_sum[l].device.type for l in hparams.layers} == {"cpu" if offload else device}
        weights[offload] = {layer: w.cpu() for layer, w in edited_weights(model, hparams).items()}
    for layer in weights[False]:
        assert torch.allclose(weights[False][layer], weights[True][layer], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field, value, expected", [
    ("projector_form", "sparse", "projector_form must be one of"),
    ("statistics_memory_gb", 0, "statistics_memory_gb must be a number of gigabytes > 0"),
    ("offload_editing_state", "yes", "offload_editing_state must be true or false"),
])
def test_bad_memory_settings_are_refused_naming_the_field(tmp_path, field, value, expected):
    with pytest.raises(ValueError, match=expected):
        make_hparams(tmp_path, "gpt2", **{field: value})


# ---------------------------------------------------------------------------
# models that accelerate dispatched with offloaded weights
# ---------------------------------------------------------------------------
def test_a_model_with_offloaded_blocks_is_refused_before_any_work(tmp_path, tokenizer):
    from accelerate import dispatch_model

    from conftest import weights_snapshot
    from alphaedit_plugin.run_settings import SettingError

    model = BUILDERS["llama"]()
    snapshot = weights_snapshot(model)
    hparams = make_hparams(tmp_path, "llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    dispatched = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "off"))
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # what device_map="auto" leaves
    with pytest.raises(SettingError, match=r"offloaded .*model\.layers\.2\.mlp\.down_proj.*device_map"):
        create_state(dispatched, tokenizer, hparams)
    assert not (tmp_path / "cache").exists()  # refused before the statistics
    with pytest.raises(SettingError, match="offloaded"):
        apply_alphaedit_to_model(dispatched, tokenizer, [FACTS[0]], hparams)
    in_memory = {name: p for name, p in dispatched.state_dict().items() if p.device.type != "meta"}
    assert all(torch.equal(in_memory[name], snapshot[name]) for name in in_memory)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the model is split across cuda:0 and cpu")
def test_a_model_split_across_a_gpu_and_the_cpu_edits_as_on_one_device(tmp_path, tokenizer):
    from accelerate import dispatch_model

    base = BUILDERS["llama"]()
    reference = copy.deepcopy(base)
    hparams = full_rank_hparams(tmp_path, "llama", reference, tokenizer, layers=[1, 2])
    apply_alphaedit_to_model(reference, tokenizer, FACTS[:2], hparams, state=create_state(reference, tokenizer, hparams))
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    split = dispatch_model(base, device_map=device_map, main_device="cpu")  # every weight in memory, none on meta
    assert {p.device.type for p in split.parameters()} == {"cuda", "cpu"}
    state = create_state(split, tokenizer, hparams)
    apply_alphaedit_to_model(split, tokenizer, FACTS[:2], hparams, state=state)
    expected, got = edited_weights(reference, hparams), edited_weights(split, hparams)
    assert got[1].device.type == "cuda" and got[2].device.type == "cpu"  # written where each layer lives
    for layer in hparams.layers:
        assert torch.allclose(got[layer].cpu(), expected[layer], rtol=1e-3, atol=1e-4)
