"""The baselines (MEMIT, PRUNE, RECT, each with and without P) in the benchmark runner, on a tiny GPT-2:
end to end, resume after a failed batch equals an uninterrupted run, the 0-edit point, hparams checks, the CLI."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from alphaedit_plugin import (EditingState, MEMITHyperParams, PRUNEHyperParams, RECTHyperParams, StateMismatchError,
                              create_state)
from alphaedit_plugin.bench import (BenchConfig, BenchmarkError, BenchmarkPaused, BenchmarkRunner, MethodOptions,
                                    RegisteredMethodRun, available_methods, run_benchmark)
from alphaedit_plugin.bench.cli import build_parser, config_from_args, main
from alphaedit_plugin.bench.methods import default_hparams_path, load_method_hparams

from conftest import assert_weights_unchanged, build_gpt2, make_hparams, make_tokenizer, weights_snapshot
from toy_methods import Flaky, as_toy, registered

BASELINE_LABELS = ("MEMIT", "MEMIT+P", "PRUNE", "PRUNE+P", "RECT", "RECT+P")
HOST_STEP_LABELS = ("MEMIT@easyeditor", "MEMIT@easyeditor+P", "PRUNE@easyeditor", "PRUNE@easyeditor+P",
                    "RECT@easyeditor", "RECT@easyeditor+P")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "alphaedit_plugin" / "shipped_hparams"  # the package data hparams/ links to
FIXTURES = Path(__file__).parent / "fixtures"
DATA = str(FIXTURES / "counterfact_flat.json")
CLASSES = {"MEMIT": MEMITHyperParams, "PRUNE": PRUNEHyperParams, "RECT": RECTHyperParams}
SHARED = ("layers", "v_num_grad_steps", "v_lr", "clamp_norm_factor", "v_weight_decay", "L2", "nullspace_threshold",
          "mom2_dataset", "mom2_n_samples", "stats_dir", "context_template_count", "context_template_length",
          "model_name", "mom2_dtype", "mom2_heldout_fraction")


def tiny_hparams(tmp_path, label, **overrides):
    """A 40-line corpus (full-rank C0, so MEMIT's solve is well posed) and a threshold that leaves P a null space
    of about 3/4 of the 128 inputs; λ small for the tiny model."""
    base = make_hparams(tmp_path, "gpt2", n_lines=40, mom2_dtype="float64", v_num_grad_steps=8,
                        nullspace_threshold=0.1)
    alg, projected = label.split("+")[0], label.endswith("+P")
    fields = {name: getattr(base, name) for name in SHARED}
    fields.update(projection=projected, mom2_update_weight=1.0)
    fields.update(overrides)
    return CLASSES[alg](**fields)


def config(tmp_path, out, methods, **kw):
    options = {m: MethodOptions(hparams=tiny_hparams(tmp_path, m)) for m in methods if m in BASELINE_LABELS}
    options.update(kw.pop("method_options", {}))
    fields = dict(methods=list(methods), dataset=DATA, edits=4, batch_size=2, output=str(out), eval_every=1,
                  model_name="tiny-gpt2", method_options=options, plots=False)
    fields.update(kw)
    return BenchConfig(**fields)


def checkpoint_weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["weights"]


def saved_state(folder: Path, hparams) -> EditingState:
    """The state the runner saved in ``folder``, made whole as the runner resumes it: on the unedited model."""
    progress = json.loads((folder / "progress.json").read_text())
    return create_state(build_gpt2(), make_tokenizer(), hparams).resume(
        folder / progress["state_dir"] / RegisteredMethodRun.STATE_FILE)


def test_every_method_and_variant_is_listed():
    assert set(available_methods()) == {"unedited", "AlphaEdit", "AlphaEdit+energy", "SPHERE", "SPHERE+energy",
                                        *BASELINE_LABELS, *HOST_STEP_LABELS,
                                        "AlphaEdit@host", "SPHERE@host"}
    assert default_hparams_path("PRUNE+P", "smollm2") == SHIPPED / "PRUNE" / "smollm2-135m-projected.yaml"
    assert default_hparams_path("RECT", "SmolLM2") == SHIPPED / "RECT" / "smollm2-135m.yaml"
    assert default_hparams_path("MEMIT", "/some/local/model") is None


@pytest.mark.parametrize("label", BASELINE_LABELS + HOST_STEP_LABELS)
def test_every_label_has_a_shipped_smollm2_yaml_that_matches_it(label):
    path = default_hparams_path(label, "smollm2")
    assert path is not None and path.is_file(), label
    hparams = load_method_hparams(label, str(path))  # checks alg_name, projection and memit_steps
    assert hparams.label == label
    assert label in available_methods()


def test_memit_and_memit_p_end_to_end(tmp_path):
    model, tok = build_gpt2(), make_tokenizer()
    before = weights_snapshot(model)
    out = tmp_path / "run"
    results = run_benchmark(config(tmp_path, out, ("MEMIT", "MEMIT+P", "unedited")), model, tok)
    assert_weights_unchanged(model, before)  # each method starts from, and leaves, the original weights

    pre = results["pre"]
    for name in ("MEMIT", "MEMIT+P", "unedited"):
        curve = results["methods"][name]["curve"]
        assert [p["edits"] for p in curve] == [0, 2, 4]
        assert curve[0]["metrics"] == pre  # the same 0-edit point for every method
    for name in ("MEMIT", "MEMIT+P"):
        result = results["methods"][name]
        assert result["final"]["efficacy"] > pre["efficacy"], (name, result["final"], pre)
        assert result["settings"]["label"] == name
        assert result["settings"]["hparams"]["projection"] is name.endswith("+P")
        assert result["settings"]["hparams"]["alg_name"] == "MEMIT"
    assert results["methods"]["unedited"]["final"] == pre
    table = (out / "results.md").read_text()
    assert "| MEMIT | 4 |" in table and "| MEMIT+P | 4 |" in table

    # The saved states: every edit logged, with its keys; only MEMIT keeps C0 (its λ·C0 prior).
    plain = saved_state(out / "methods" / "MEMIT", tiny_hparams(tmp_path, "MEMIT"))
    projected = saved_state(out / "methods" / "MEMIT+P", tiny_hparams(tmp_path, "MEMIT+P"))
    assert plain.edits_applied == projected.edits_applied == 4
    assert plain.identity["method"] == "MEMIT" and projected.identity["method"] == "MEMIT+P"
    assert all(float(c.abs().max()) > 0 for c in projected.earlier_keys_kkt_sum.values())
    assert set(plain.second_moments) == set(plain.layers) and projected.second_moments == {}

    # The accumulated update of MEMIT+P lies in the null space (P Δ = Δ for GPT-2's (in, out) Conv1D weight);
    # MEMIT's does not.
    for name, state in (("MEMIT", plain), ("MEMIT+P", projected)):
        weights = checkpoint_weights(out / "methods" / name)
        for layer in state.layers:
            param = f"transformer.h.{layer}.mlp.c_proj.weight"
            delta = (weights[param] - before[param]).double()
            projector = state.null_spaces[layer].projector.double()
            leaves = float((projector @ delta - delta).norm() / delta.norm())
            assert delta.norm() > 0
            assert (leaves < 1e-5) if name == "MEMIT+P" else (leaves > 1e-2), (name, layer, leaves)


@pytest.fixture
def flaky():
    """``flaky("MEMIT+P")`` registers the toy FlakyMEMIT and gives its label "FlakyMEMIT+P" and hparams class."""
    blocks = []

    def register(label):
        alg, _, suffix = label.partition("+")
        block = registered(f"Flaky{alg}")
        toy_class = block.__enter__()
        blocks.append(block)
        return f"Flaky{label}", toy_class

    yield register
    for block in blocks:
        block.__exit__(None, None, None)


@pytest.mark.parametrize("label", ["MEMIT+P", "PRUNE"])  # Kp Kpᵀ carried; PRUNE's original weights and totals
def test_resume_after_a_failed_batch_equals_an_uninterrupted_run(tmp_path, flaky, label):
    model, tok = build_gpt2(), make_tokenizer()
    before = weights_snapshot(model)
    name, toy_class = flaky(label)
    options = {name: MethodOptions(hparams=as_toy(tiny_hparams(tmp_path, label), toy_class))}
    cfg = dict(methods=(name,), edits=5, batch_size=2, method_options=options)

    Flaky.reset(fail_at=2)
    crash = rf"{re.escape(name)}: batch 2 of 3 .*simulated crash.*run the same command again"
    with pytest.raises(BenchmarkError, match=crash):
        run_benchmark(config(tmp_path, tmp_path / "run", **cfg), model, tok)
    assert_weights_unchanged(model, before)
    folder = tmp_path / "run" / "methods" / name
    assert json.loads((folder / "progress.json").read_text())["batches_done"] == 1
    assert saved_state(folder, options[name].hparams).edits_applied == 2

    # Resumed as on another machine: the run folder only, no statistics cache (made again from the corpus).
    shutil.rmtree(options[name].hparams.stats_dir)
    Flaky.reset()
    resumed = run_benchmark(config(tmp_path, tmp_path / "run", **cfg), model, tok)
    assert Flaky.calls == 2  # batches 2 and 3 only
    Flaky.reset()
    fresh = run_benchmark(config(tmp_path, tmp_path / "fresh", **cfg), model, tok)
    assert Flaky.calls == 3
    assert_weights_unchanged(model, before)

    assert resumed["methods"][name]["final"] == fresh["methods"][name]["final"]
    assert [p["edits"] for p in resumed["methods"][name]["curve"]] == [0, 2, 4, 5]
    assert [p["metrics"] for p in resumed["methods"][name]["curve"]] == \
        [p["metrics"] for p in fresh["methods"][name]["curve"]]
    # Bit for bit: the edited weights and the sequential state.
    resumed_weights = checkpoint_weights(folder)
    fresh_weights = checkpoint_weights(tmp_path / "fresh" / "methods" / name)
    assert resumed_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(resumed_weights[k], fresh_weights[k]) for k in fresh_weights)
    assert any(not torch.equal(fresh_weights[k], before[k]) for k in fresh_weights)
    a = saved_state(folder, options[name].hparams)
    b = saved_state(tmp_path / "fresh" / "methods" / name, options[name].hparams)
    assert a.edits_applied == b.edits_applied == 5
    for layer in b.layers:
        assert torch.equal(a.earlier_keys_kkt_sum[layer], b.earlier_keys_kkt_sum[layer])
        if label == "PRUNE":
            assert torch.equal(a.second_moments[layer], b.second_moments[layer])
    totals = b.running_sums.get("raw_totals", {})
    assert set(a.running_sums.get("raw_totals", {})) == set(totals) == (set(b.layers) if label == "PRUNE" else set())
    for layer, total in totals.items():
        assert float(total.abs().max()) > 0 and torch.equal(a.running_sums["raw_totals"][layer], total)
        assert torch.equal(a.reference_tensors["original_weights"][layer],
                           b.reference_tensors["original_weights"][layer])


def test_a_run_in_parts_pauses_at_its_time_budget_and_continues_to_the_same_numbers(tmp_path):
    model, tok = build_gpt2(), make_tokenizer()
    before = weights_snapshot(model)
    out = tmp_path / "run"
    with pytest.raises(BenchmarkPaused, match=r"MEMIT\+P: paused after batch 1 of 2 .*run the same command again"):
        run_benchmark(config(tmp_path, out, ("MEMIT+P",), time_budget_minutes=1e-9), model, tok)
    assert_weights_unchanged(model, before)
    assert not (out / "results.json").exists()  # a paused run is not reported as finished
    assert json.loads((out / "methods" / "MEMIT+P" / "progress.json").read_text())["batches_done"] == 1
    resumed = run_benchmark(config(tmp_path, out, ("MEMIT+P",)), model, tok)
    fresh = run_benchmark(config(tmp_path, tmp_path / "fresh", ("MEMIT+P",)), model, tok)
    assert resumed["methods"]["MEMIT+P"]["final"] == fresh["methods"]["MEMIT+P"]["final"]
    assert [p["metrics"] for p in resumed["methods"]["MEMIT+P"]["curve"]] == \
        [p["metrics"] for p in fresh["methods"]["MEMIT+P"]["curve"]]
    with pytest.raises(ValueError, match="time budget must be a number of minutes > 0"):
        config(tmp_path, out, ("MEMIT+P",), time_budget_minutes=0).validate()


def test_a_resume_with_other_hparams_is_refused(tmp_path, flaky):
    model, tok = build_gpt2(), make_tokenizer()
    name, toy_class = flaky("MEMIT")
    cfg = dict(methods=(name,), edits=5, batch_size=2)
    Flaky.reset(fail_at=2)
    with pytest.raises(BenchmarkError, match="simulated crash"):
        run_benchmark(config(tmp_path, tmp_path / "run", method_options={
            name: MethodOptions(hparams=as_toy(tiny_hparams(tmp_path, "MEMIT"), toy_class))}, **cfg), model, tok)
    Flaky.reset()
    with pytest.raises(BenchmarkError, match=r"other settings \(hparams\.v_lr\)"):
        run_benchmark(config(tmp_path, tmp_path / "run", method_options={
            name: MethodOptions(hparams=as_toy(tiny_hparams(tmp_path, "MEMIT", v_lr=0.25), toy_class))}, **cfg),
            model, tok)
    assert Flaky.calls == 0


def test_the_resume_state_holds_what_the_edits_added_and_comes_back_whole(tmp_path):
    """The runner's resume file keeps Kp Kpᵀ, the running sums and the log, not P, C0 or the unedited weights
    (made again from the statistics cache); resumed, the state equals the one that was saved."""
    model, tok = build_gpt2(), make_tokenizer()
    hparams = tiny_hparams(tmp_path, "PRUNE+P")
    method = RegisteredMethodRun(model, tok, MethodOptions(hparams=hparams), label="PRUNE+P")
    method.prepare()
    method.edit([{"prompt": "The capital of France", "subject": "France", "target_new": "Rome"}])
    method.save_state(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.pt"]
    saved = torch.load(tmp_path / "state" / "state.pt", weights_only=True)
    assert saved["accumulated_only"] and not {"null_spaces", "second_moments", "reference_tensors"} & set(saved)
    assert {entry["form"] for entry in saved["earlier_keys_kkt_sum"].values()} == {"keys"}  # one key per layer
    with pytest.raises(ValueError, match=r"holds only what the edits added .* state\.resume"):
        EditingState.load(tmp_path / "state" / RegisteredMethodRun.STATE_FILE)

    unedited = build_gpt2()  # the runner resumes on the unedited model, then loads the checkpoint's weights
    resumed = RegisteredMethodRun(unedited, tok, MethodOptions(hparams=hparams), label="PRUNE+P")
    resumed.load_state(tmp_path / "state")
    loaded, state = resumed.state, method.state
    assert loaded.identity == state.identity and loaded.edits_applied == 1
    assert loaded.context_templates == state.context_templates
    for layer in hparams.layers:
        assert torch.equal(loaded.running_sums["raw_totals"][layer], state.running_sums["raw_totals"][layer])
        assert torch.equal(loaded.reference_tensors["original_weights"][layer],
                           state.reference_tensors["original_weights"][layer])
        assert torch.equal(loaded.earlier_keys_kkt_sum[layer], state.earlier_keys_kkt_sum[layer])
        assert torch.equal(loaded.null_spaces[layer].projector, state.null_spaces[layer].projector)

    # Resumed for another method, layer set or model: refused, naming what differs.
    for other, what in ((tiny_hparams(tmp_path, "MEMIT+P"), "method: state has 'PRUNE\\+P', edit needs 'MEMIT\\+P'"),
                        (tiny_hparams(tmp_path, "PRUNE+P", layers=[2, 3]), "layers"),
                        (tiny_hparams(tmp_path, "PRUNE+P", model_name="another-model"), "model")):
        label = "MEMIT+P" if other.alg_name == "MEMIT" else "PRUNE+P"
        another = RegisteredMethodRun(build_gpt2(), tok, MethodOptions(hparams=other), label=label)
        with pytest.raises(StateMismatchError, match=what):
            another.load_state(tmp_path / "state")
    fresh = RegisteredMethodRun(build_gpt2(), tok, MethodOptions(hparams=hparams), label="PRUNE+P")
    fresh.prepare()
    fresh.state.resume(tmp_path / "state" / "state.pt")
    with pytest.raises(StateMismatchError, match="needs a fresh state"):
        fresh.state.resume(tmp_path / "state" / "state.pt")
    torch.save({"format": 7}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an editing state file of format 3 .*format 7"):
        EditingState.load(tmp_path / "other.pt")


def test_the_zero_edit_point_is_scored_once_and_shared(tmp_path, monkeypatch):
    model, tok = build_gpt2(), make_tokenizer()
    calls = []
    original = BenchmarkRunner._evaluate

    def counting(self, cases, reference, **kwargs):
        calls.append(len(cases))
        return original(self, cases, reference, **kwargs)

    monkeypatch.setattr(BenchmarkRunner, "_evaluate", counting)
    cfg = config(tmp_path, tmp_path / "run", ("MEMIT", "unedited"))
    results = run_benchmark(cfg, model, tok)
    # once for the unedited model (all 4 cases), then per method after batch 1 (2 cases) and at the end (4)
    assert calls == [4, 2, 4, 2, 4]
    reference = json.loads((tmp_path / "run" / "reference.json").read_text())
    for result in results["methods"].values():
        assert result["curve"][0] == {"edits": 0, "metrics": reference["pre"], "general": None}
    assert results["methods"]["MEMIT"]["curve"][1]["metrics"] != reference["pre"]

    calls.clear()  # a finished run read back: nothing scored again, the 0-edit point still there
    again = run_benchmark(cfg, model, tok)
    assert calls == [] and again["methods"]["MEMIT"]["curve"] == results["methods"]["MEMIT"]["curve"]


@pytest.mark.parametrize("label, path, message", [
    ("MEMIT+P", "hparams/MEMIT/smollm2-135m.yaml", "MEMIT\\+P needs hparams with projection: true, but .*"
                                                   "smollm2-135m.yaml has projection: false"),
    ("MEMIT", "hparams/MEMIT/smollm2-135m-projected.yaml", "MEMIT needs hparams with projection: false"),
    ("PRUNE", "hparams/MEMIT/smollm2-135m.yaml", "PRUNE needs hparams with alg_name: PRUNE, but .* alg_name: MEMIT"),
    ("RECT+P", "hparams/AlphaEdit/smollm2-135m.yaml", "RECT\\+P needs hparams with alg_name: RECT, but .* "
                                                      "alg_name: AlphaEdit"),
    ("MEMIT@easyeditor", "hparams/MEMIT/smollm2-135m.yaml", "MEMIT@easyeditor needs hparams with memit_steps: "
                                                            "easyeditor, but .* has memit_steps: plugin"),
    ("MEMIT+P", "hparams/MEMIT/smollm2-135m-easyeditor-projected.yaml", "needs hparams with memit_steps: plugin"),
])
def test_a_yaml_for_another_label_is_refused(label, path, message):
    with pytest.raises(ValueError, match=message) as error:
        load_method_hparams(label, str(ROOT / path))
    assert f"--method-hparams {label}=PATH" in str(error.value)


def test_hparams_checks(tmp_path):
    assert load_method_hparams("RECT+P", str(ROOT / "hparams/RECT/smollm2-135m-projected.yaml"),
                                 {"mom2_dataset": "corpus.txt"}).mom2_dataset == "corpus.txt"
    with pytest.raises(ValueError, match="MEMIT needs hyperparameters: pass --method-hparams MEMIT=PATH"):
        load_method_hparams("MEMIT", None)
    with pytest.raises(ValueError, match="MEMIT\\+P needs hparams with projection: true"):  # overrides are checked
        load_method_hparams("MEMIT+P", tiny_hparams(tmp_path, "MEMIT+P"), {"projection": False})
    with pytest.raises(ValueError, match="hparams have no field 'no_such'"):
        load_method_hparams("MEMIT", tiny_hparams(tmp_path, "MEMIT"), {"no_such": 1})
    with pytest.raises(FileNotFoundError, match="PRUNE: hparams file not found"):
        load_method_hparams("PRUNE", str(tmp_path / "missing.yaml"))


def args(*extra):
    return build_parser().parse_args(["--data", DATA, "--edits", "2", "--output", "o", *extra])


def test_cli_assigns_hparams_per_method():
    memit = str(ROOT / "hparams/MEMIT/smollm2-135m.yaml")
    projected = str(ROOT / "hparams/MEMIT/smollm2-135m-projected.yaml")
    cfg = config_from_args(args("--methods", "AlphaEdit", "MEMIT", "MEMIT+P", "unedited", "--model", "smollm2",
                                "--method-hparams", f"MEMIT={memit}", "--corpus", "wiki.txt"))
    options = cfg.method_options
    assert options["MEMIT"].hparams == memit
    assert options["MEMIT+P"].hparams == str(SHIPPED / "MEMIT/smollm2-135m-projected.yaml")  # smollm2's default
    assert options["AlphaEdit"].hparams == str(SHIPPED / "AlphaEdit/smollm2-135m.yaml")
    assert options["MEMIT+P"].overrides["mom2_dataset"] == "wiki.txt" and options["unedited"].hparams is None
    # --hparams: the one method left without --method-hparams
    cfg = config_from_args(args("--methods", "MEMIT", "MEMIT+P", "unedited", "--model", "/local/model",
                                "--hparams", projected, "--method-hparams", f"MEMIT={memit}"))
    assert cfg.method_options["MEMIT+P"].hparams == projected and cfg.method_options["MEMIT"].hparams == memit


@pytest.mark.parametrize("extra, message", [
    (["--methods", "MEMIT", "MEMIT+P", "--hparams", "x.yaml"],
     "--hparams x.yaml is for exactly one method .* 2 \\(MEMIT, MEMIT\\+P\\) .*--method-hparams LABEL=PATH"),
    (["--methods", "MEMIT", "--method-hparams", "PRUNE=x.yaml"], "PRUNE is not one of --methods"),
    (["--methods", "MEMIT", "--method-hparams", "MEMIT"], "--method-hparams expects LABEL=PATH"),
    (["--methods", "MEMIT", "unedited", "--method-hparams", "unedited=x.yaml"], "unedited takes no hyperparameters"),
    (["--methods", "MEMIT", "--model", "/no/such/model"], "MEMIT needs hyperparameters: pass --method-hparams MEMIT="),
    (["--methods", "MEMIT+P", "--method-hparams", "MEMIT+P=hparams/MEMIT/smollm2-135m.yaml"],
     "MEMIT\\+P needs hparams with projection: true"),
])
def test_cli_bad_hparams_exit_before_the_model_load(tmp_path, caplog, monkeypatch, extra, message):
    monkeypatch.chdir(ROOT)
    import alphaedit_plugin.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["--data", DATA, "--edits", "2", "--output", str(tmp_path / "o"), "--model", "smollm2", *extra])
    assert code == 2
    assert any(record.levelname == "ERROR" for record in caplog.records)
    assert re.search(message, caplog.text), caplog.text


def test_cli_runs_baselines_on_a_saved_tiny_model(tmp_path, capsys):
    model_dir = tmp_path / "model"
    build_gpt2().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    files = {}
    for label in ("MEMIT", "MEMIT+P"):
        hparams = tiny_hparams(tmp_path, label).to_dict()
        corpus = hparams.pop("mom2_dataset")
        hparams["mom2_dataset"] = "self"  # replaced by --corpus, as in the shipped yaml files
        files[label] = tmp_path / f"{label}.yaml"
        files[label].write_text(yaml.safe_dump(hparams))
    out = tmp_path / "cli"
    code = main(["--methods", "MEMIT", "MEMIT+P", "--model", str(model_dir), "--data", DATA, "--edits", "4",
                 "--batch-size", "2", "--eval-every", "1", "--output", str(out), "--no-plots",
                 "--method-hparams", f"MEMIT={files['MEMIT']}", f"MEMIT+P={files['MEMIT+P']}",
                 "--corpus", corpus, "--stats-dir", str(tmp_path / "cli-cache")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| MEMIT | 4 |" in printed and "| MEMIT+P | 4 |" in printed
    results = json.loads((out / "results.json").read_text())
    for label in ("MEMIT", "MEMIT+P"):
        result = results["methods"][label]
        assert result["settings"]["hparams"]["mom2_dataset"] == corpus
        assert [p["edits"] for p in result["curve"]] == [0, 2, 4]
        assert result["final"]["efficacy"] > results["pre"]["efficacy"]
    assert any((tmp_path / "cli-cache").rglob("*.pt"))
