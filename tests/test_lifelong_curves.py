"""The long-run curve figures: the null space left by the edits, held-out perplexity, the evenly spread curve
sample, and the runner that records them at every point."""

import json
import math

import pytest
import torch

from alphaedit_plugin.bench import BenchConfig, BenchmarkError, MethodOptions, run_benchmark
from alphaedit_plugin.bench.runner import spread_indices
from alphaedit_plugin.corpus import corpus_token_sequences
from alphaedit_plugin.evaluation.perplexity import heldout_sequences, perplexity
from alphaedit_plugin.layer_statistics import heldout_every
from alphaedit_plugin.null_space_capacity import null_space_occupancy
from alphaedit_plugin.null_space_projector import FactoredProjector
from alphaedit_plugin.second_moment import is_heldout

from conftest import BUILDERS, make_hparams, make_tokenizer
from test_eval_runner import FIXTURES


# -- the null space left ---------------------------------------------------------------------------------------------
def _null_basis(d=24, r=10, seed=0):
    torch.manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q[:, :r], q[:, r:]  # the null space's basis and its complement's


def _forms(null, rest):
    return {"dense": (null @ null.T).float(), "factored": FactoredProjector(null.float(), complement=False),
            "complement": FactoredProjector(rest.float(), complement=True)}


@pytest.mark.parametrize("form", ["dense", "factored", "complement"])
def test_occupancy_counts_the_directions_edit_keys_take_in_the_null_space(form):
    null, rest = _null_basis()
    projector = _forms(null, rest)[form]
    torch.manual_seed(1)
    inside = null @ torch.randn(null.shape[1], 4, dtype=torch.float64) * 30  # 4 keys in the null space
    outside = rest @ torch.randn(rest.shape[1], 6, dtype=torch.float64) * 30  # 6 keys the statistics occupy
    for keys, occupied in [(inside, 4), (outside, 0), (torch.cat([inside, outside], 1), 4)]:
        figures = null_space_occupancy(projector, (keys @ keys.T).float(), null.shape[1], tolerance=1.0)
        assert figures == {"null_space": 10, "occupied": occupied, "left": 10 - occupied}
    many = null @ torch.randn(null.shape[1], 25, dtype=torch.float64) * 30  # more keys than directions
    assert null_space_occupancy(projector, (many @ many.T).float(), 10, 1.0)["left"] == 0
    empty = torch.zeros(24, 24)
    assert null_space_occupancy(projector, empty, 10, 1.0) == {"null_space": 10, "occupied": 0, "left": 10}


def test_occupancy_leaves_out_directions_below_the_tolerance():
    null, rest = _null_basis()
    faint = null[:, :3] * 0.1  # eigenvalues 0.01 of Kp Kpᵀ
    strong = null[:, 3:5] * 10  # eigenvalues 100
    keys = torch.cat([faint, strong], 1)
    kkt = (keys @ keys.T).float()
    assert null_space_occupancy((null @ null.T).float(), kkt, 10, tolerance=1.0)["occupied"] == 2
    assert null_space_occupancy((null @ null.T).float(), kkt, 10, tolerance=1e-3)["occupied"] == 5
    with pytest.raises(ValueError, match="tolerance"):
        null_space_occupancy((null @ null.T).float(), kkt, 10, tolerance=0)
    with pytest.raises(ValueError, match="one size"):
        null_space_occupancy((null @ null.T).float(), torch.zeros(5, 5), 10, tolerance=1.0)


# -- the curve sample --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edited,sample", [(10, 3), (3000, 500), (7, 6), (501, 500)])
def test_spread_indices_are_distinct_and_span_old_to_new_edits(edited, sample):
    indices = spread_indices(edited, sample)
    assert len(indices) == sample and indices == sorted(set(indices))
    assert 0 <= indices[0] < edited / sample and edited - edited / sample <= indices[-1] < edited
    gaps = [b - a for a, b in zip(indices, indices[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread


def test_spread_indices_take_everything_when_the_sample_is_not_smaller():
    assert spread_indices(5, 0) == spread_indices(5, 5) == spread_indices(5, 9) == [0, 1, 2, 3, 4]


# -- perplexity --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_perplexity_is_the_exponent_of_the_mean_token_loss(arch):
    model, tok = BUILDERS[arch](), make_tokenizer()
    torch.manual_seed(0)
    sequences = [torch.randint(3, tok.vocab_size, (n,)).tolist() for n in (5, 12, 9, 2, 30)]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:  # one unpadded sequence at a time
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
            total += float(out.loss) * (len(ids) - 1)
            count += len(ids) - 1
    model.train()
    assert perplexity(model, tok, sequences) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert model.training  # the caller's mode is left as it was
    with pytest.raises(ValueError, match="2 tokens"):
        perplexity(model, tok, [[5]])


def test_heldout_sequences_are_the_texts_the_statistics_leave_out(tmp_path):
    model, tok = BUILDERS["llama"](), make_tokenizer()
    hparams = make_hparams(tmp_path, "llama", n_lines=40, mom2_heldout_fraction=0.25)
    every = heldout_every(hparams)
    assert every == 4
    everything = corpus_token_sequences(hparams.mom2_dataset, model, tok, hparams.mom2_n_samples,
                                        hparams.mom2_max_tokens, hparams.seed)
    held = heldout_sequences(model, tok, hparams, 100)
    assert held == [ids for i, ids in enumerate(everything) if is_heldout(i, every)] and len(held) == 10
    assert heldout_sequences(model, tok, hparams, 3) == held[:3]
    hparams.mom2_heldout_fraction = 0.0
    with pytest.raises(ValueError, match="mom2_heldout_fraction"):
        heldout_sequences(model, tok, hparams, 3)


# -- the runner ----------------------------------------------------------------------------------------------------------
def _config(tmp_path, out, methods=("AlphaEdit", "MEMIT", "unedited"), **kw):
    from alphaedit_plugin.methods.memit import MEMITHyperParams

    hparams = make_hparams(tmp_path, "gpt2", n_lines=40, mom2_heldout_fraction=0.25, v_num_grad_steps=8,
                           mom2_dtype="float64", nullspace_threshold=1e-2)
    memit = MEMITHyperParams(**{**{k: v for k, v in vars(hparams).items() if k in MEMITHyperParams.__dataclass_fields__},
                                "alg_name": "MEMIT", "mom2_update_weight": 100.0})
    options = {"AlphaEdit": MethodOptions(hparams=hparams), "MEMIT": MethodOptions(hparams=memit)}
    fields = dict(methods=list(methods), dataset=str(FIXTURES / "counterfact_flat.json"), edits=5, batch_size=2,
                  output=str(out), eval_every=1, model_name="tiny-gpt2",
                  method_options={m: o for m, o in options.items() if m in methods},
                  curve_sample=2, perplexity_texts=5, null_space_curve=True, plots=False)
    fields.update(kw)
    return BenchConfig(**fields)


def test_runner_records_the_sample_perplexity_and_null_space_at_every_point(tmp_path, monkeypatch):
    from alphaedit_plugin.bench.runner import BenchmarkRunner

    scored = []  # the case indices of every evaluation, in order
    evaluate = BenchmarkRunner._evaluate

    def recording(self, cases, reference, curve_point=False):
        scored.append([case.index for case in cases])
        return evaluate(self, cases, reference, curve_point)

    monkeypatch.setattr(BenchmarkRunner, "_evaluate", recording)
    model, tok = BUILDERS["gpt2"](), make_tokenizer()
    out = tmp_path / "run"
    results = run_benchmark(_config(tmp_path, out), model, tok)
    alpha, memit, unedited = (results["methods"][m] for m in ("AlphaEdit", "MEMIT", "unedited"))
    assert [p["edits"] for p in alpha["curve"]] == [0, 2, 4, 5]
    assert [p.get("scored_cases") for p in alpha["curve"]] == [None, None, 2, 2]  # 2 edited: all of them
    # per method: the sample after 2 and 4 edits, spread from the oldest to the newest; after the last batch all
    # five (the final figures), then the sample again (the curve's last point)
    per_method = [[0, 1], [1, 3], [0, 1, 2, 3, 4], [1, 3]]
    assert scored == [[0, 1, 2, 3, 4]] + per_method * 3  # the unedited model's scores first
    # the unedited model's perplexity is the same at every point; the edits change it
    pre = results["perplexity_pre"]
    assert all(p["perplexity"] == pytest.approx(pre) for p in unedited["curve"])
    assert alpha["perplexity"] != pytest.approx(pre, rel=1e-9)
    # the null space: each edit takes directions, none are given back
    lefts = [sum(v["left"] for v in p["null_space"].values()) for p in alpha["curve"][1:]]
    assert lefts == sorted(lefts, reverse=True) and lefts[0] < sum(
        v["null_space"] for v in alpha["curve"][1]["null_space"].values())
    assert all("null_space" not in p for p in memit["curve"])  # MEMIT has none
    table = (out / "results.md").read_text()
    assert "Curves" in table and "Held-out ppl" in table and "Null space left" in table
    assert json.loads((out / "results.json").read_text())["perplexity_pre"] == pre


def test_curve_settings_are_part_of_the_run_identity_only_where_set(tmp_path):
    plain = _config(tmp_path, tmp_path / "a", curve_sample=0, perplexity_texts=0, null_space_curve=False)
    assert not {"curve_sample", "perplexity_texts", "null_space_curve"} & set(plain.identity("sha"))
    model, tok = BUILDERS["gpt2"](), make_tokenizer()
    out = tmp_path / "run"
    run_benchmark(_config(tmp_path, out, methods=["unedited"], edits=2, perplexity_texts=0), model, tok)
    with pytest.raises(BenchmarkError, match="curve_sample"):
        run_benchmark(_config(tmp_path, out, methods=["unedited"], edits=2, perplexity_texts=0, curve_sample=1),
                      model, tok)
    with pytest.raises(ValueError, match="curve_sample"):
        _config(tmp_path, tmp_path / "b", curve_sample=-1).validate()


def test_perplexity_needs_one_statistics_corpus_and_held_out_texts(tmp_path):
    model, tok = BUILDERS["gpt2"](), make_tokenizer()
    config = _config(tmp_path, tmp_path / "run", methods=["unedited"], edits=2)
    with pytest.raises(BenchmarkError, match="statistics settings"):
        run_benchmark(config, model, tok)
    config = _config(tmp_path, tmp_path / "run2", methods=["AlphaEdit", "MEMIT"], edits=2)
    config.method_options["MEMIT"].hparams.mom2_n_samples = 7
    with pytest.raises(BenchmarkError, match="one statistics corpus"):
        run_benchmark(config, model, tok)
    config = _config(tmp_path, tmp_path / "run3", methods=["AlphaEdit"], edits=2)
    config.method_options["AlphaEdit"].hparams.mom2_heldout_fraction = 0.0
    with pytest.raises(BenchmarkError, match="mom2_heldout_fraction"):
        run_benchmark(config, model, tok)
