"""The benchmark runner end to end on a tiny model: results, table, plots, resume after a failure, the CLI."""

import json
from pathlib import Path

import pytest

from alphaedit_plugin import AlphaEditHyperParams, register_method
from alphaedit_plugin.bench import BenchConfig, BenchmarkError, MethodOptions, run_benchmark
from alphaedit_plugin.bench.cli import main
from alphaedit_plugin.evaluation import EvalOptions
from alphaedit_plugin.methods.alphaedit import AlphaEdit

from conftest import build_gpt2, exact_hparams, make_tokenizer, weights_snapshot, assert_weights_unchanged
from toy_methods import Flaky, FlakyAlphaEditHyperParams, as_toy, registered

FIXTURES = Path(__file__).parent / "fixtures"


def config(tmp_path, out, methods=("AlphaEdit", "unedited"), **kw):
    hparams = exact_hparams(tmp_path, "gpt2", v_num_grad_steps=8)
    options = {m: MethodOptions(hparams=hparams) for m in methods}
    options.update(kw.pop("method_options", {}))
    fields = dict(methods=list(methods), dataset=str(FIXTURES / "counterfact_flat.json"), edits=4, batch_size=2,
                  output=str(out), eval_every=1, model_name="tiny-gpt2", method_options=options,
                  general_tasks=["sst2"], glue_dir=str(FIXTURES / "glue"), general_n=2, general_start=0,
                  representation_prompts=1)
    fields.update(kw)
    return BenchConfig(**fields)


def test_end_to_end(tmp_path):
    model, tok = build_gpt2(), make_tokenizer()
    before = weights_snapshot(model)
    results = run_benchmark(config(tmp_path, tmp_path / "run"), model, tok)
    out = tmp_path / "run"
    assert_weights_unchanged(model, before)  # every method starts from, and leaves, the original weights
    assert set(results["methods"]) == {"AlphaEdit", "unedited"}
    alpha, unedited = results["methods"]["AlphaEdit"], results["methods"]["unedited"]
    assert [p["edits"] for p in alpha["curve"]] == [0, 2, 4]  # unedited, after batch 1 and after the last
    assert alpha["curve"][0] == {"edits": 0, "metrics": results["pre"], "general": results["general_pre"]}
    assert unedited["final"]["efficacy"] == results["pre"]["efficacy"]
    assert alpha["final"]["efficacy"] >= results["pre"]["efficacy"]
    assert alpha["general"]["sst2"]["n"] == 2 and "relative_shift" in alpha["representation"]
    assert unedited["representation"]["relative_shift"] == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["AlphaEdit"]["final"] == alpha["final"]
    table = (out / "results.md").read_text()
    assert "| AlphaEdit | 4 |" in table and "| unedited | 4 |" in table and "(before editing)" in table
    assert "Efficacy" in table and "sst2 F1" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("plot_efficacy.png", "plot_specificity.png", "general_sst2.png", "representation.png"):
        assert (out / name).stat().st_size > 0, name


@pytest.fixture
def flaky():
    with registered("FlakyAlphaEdit"):
        yield Flaky


def test_resume_after_a_failed_batch_gives_the_uninterrupted_result(tmp_path, flaky):
    model, tok = build_gpt2(), make_tokenizer()
    before = weights_snapshot(model)
    hparams = as_toy(exact_hparams(tmp_path, "gpt2", v_num_grad_steps=8), FlakyAlphaEditHyperParams)
    cfg = dict(methods=("FlakyAlphaEdit",), edits=5, batch_size=2, general_tasks=[], representation_prompts=0,
               method_options={"FlakyAlphaEdit": MethodOptions(hparams=hparams)})
    flaky.reset(fail_at=2)
    with pytest.raises(BenchmarkError, match=r"FlakyAlphaEdit: batch 2 of 3 \(records 2\.\.3 of .*counterfact_flat"
                                             r"\.json\) failed: .*simulated crash.*run the same command again"):
        run_benchmark(config(tmp_path, tmp_path / "run", **cfg), model, tok)
    assert_weights_unchanged(model, before)
    progress = json.loads((tmp_path / "run" / "methods" / "FlakyAlphaEdit" / "progress.json").read_text())
    assert progress["status"] == "failed" and progress["batches_done"] == 1 and progress["failed_batch"] == 2
    assert (tmp_path / "run" / "methods" / "FlakyAlphaEdit" / "checkpoint.pt").exists()

    flaky.reset()
    resumed = run_benchmark(config(tmp_path, tmp_path / "run", **cfg), model, tok)
    assert flaky.calls == 2  # batches 2 and 3 only: batch 1 was not redone
    flaky.calls = 0
    fresh = run_benchmark(config(tmp_path, tmp_path / "fresh", **cfg), model, tok)
    assert flaky.calls == 3
    assert resumed["methods"]["FlakyAlphaEdit"]["final"] == fresh["methods"]["FlakyAlphaEdit"]["final"]
    assert [p["metrics"] for p in resumed["methods"]["FlakyAlphaEdit"]["curve"]] == \
        [p["metrics"] for p in fresh["methods"]["FlakyAlphaEdit"]["curve"]]
    assert_weights_unchanged(model, before)

    flaky.calls = 0  # a complete run is not redone
    again = run_benchmark(config(tmp_path, tmp_path / "run", **cfg), model, tok)
    assert flaky.calls == 0 and again["methods"]["FlakyAlphaEdit"]["final"] == resumed["methods"]["FlakyAlphaEdit"]["final"]


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    model, tok = build_gpt2(), make_tokenizer()
    cfg = dict(methods=("unedited",), general_tasks=[], representation_prompts=0, eval_every=0)
    run_benchmark(config(tmp_path, tmp_path / "run", **cfg), model, tok)
    with pytest.raises(BenchmarkError, match="holds a run with other settings.*batch_size"):
        run_benchmark(config(tmp_path, tmp_path / "run", batch_size=1, **cfg), model, tok)


def test_registry_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_method("AlphaEdit", AlphaEditHyperParams, AlphaEdit)
    with pytest.raises(ValueError, match="unknown method"):
        BenchConfig(methods=["NoSuch"], dataset="x", edits=1, batch_size=1, output="o").validate()


def test_cli_on_a_saved_tiny_model(tmp_path, capsys):
    import torch

    model_dir = tmp_path / "model"
    build_gpt2().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "cli"
    threads = torch.get_num_threads()
    try:
        code = main(["--methods", "unedited", "--model", str(model_dir), "--data", str(FIXTURES / "zsre_mend.json"),
                     "--edits", "2", "--batch-size", "1", "--output", str(out), "--no-plots", "--threads", "2"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = capsys.readouterr().out
    assert "| unedited | 2 |" in printed and (out / "results.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["dataset"]["family"] == "zsre"
    assert saved["command"].startswith("alphaedit-bench --methods unedited --model ") and "--edits 2" in saved["command"]
    assert saved["machine"]["device"] == "cpu" and saved["machine"]["cpu_threads"] == 2  # conftest runs with 1


def test_cli_edits_several_files_of_one_schema_in_order(tmp_path, capsys, caplog):
    """``--data a.json b.json``: one run over both files (a 2,000-edit ZsRE run needs MEND's two files); the run
    identity holds the files in their order, so the same folder refuses them in another order."""
    import torch

    model_dir = tmp_path / "model"
    build_gpt2().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    records = json.loads((FIXTURES / "zsre_mend.json").read_text())
    second = tmp_path / "second.json"
    second.write_text(json.dumps([dict(r, src=r["src"] + " again") for r in records]))
    first = str(FIXTURES / "zsre_mend.json")
    threads = torch.get_num_threads()

    def run(out, *data):
        return main(["--methods", "unedited", "--model", str(model_dir), "--data", *data, "--edits", "3",
                     "--batch-size", "2", "--output", str(out), "--no-plots"])
    try:
        assert run(tmp_path / "both", first, str(second)) == 0
        saved = json.loads((tmp_path / "both" / "results.json").read_text())
        assert saved["dataset"]["path"].endswith(" + " + str(second)) and saved["protocol"]["edits"] == 3
        (tmp_path / "one").mkdir()
        assert run(tmp_path / "one", first, str(second)) == 0
        caplog.clear()
        assert run(tmp_path / "one", str(second), first) == 2  # another sequence of edits in the same folder
        assert "holds a run with other settings (dataset_sha256" in caplog.text
    finally:
        torch.set_num_threads(threads)


def test_cli_refuses_zero_threads(tmp_path, caplog):
    code = main(["--methods", "unedited", "--data", str(FIXTURES / "zsre_mend.json"), "--edits", "1",
                 "--output", str(tmp_path / "o"), "--threads", "0"])
    assert code == 2 and "--threads must be >= 1, got 0" in caplog.text


def test_cli_bad_input_exits_with_a_message(tmp_path, caplog):
    code = main(["--methods", "unedited", "--model", "smollm2", "--data", str(FIXTURES / "zsre_mend.json"),
                 "--edits", "3", "--output", str(tmp_path / "o")])
    assert code == 2  # the data are checked before the model is loaded
    assert "3 edits requested but the file has only 2 records" in caplog.text


@pytest.mark.parametrize("every_point", [False, True])
def test_generated_text_metrics_at_curve_points_only_when_asked(tmp_path, every_point):
    model, tok = build_gpt2(), make_tokenizer()
    cfg = config(tmp_path, tmp_path / "run", methods=("unedited",), general_tasks=[], representation_prompts=0,
                 eval=EvalOptions(fluency=True, generation_tokens=5), generation_at_curve_points=every_point)
    curve = run_benchmark(cfg, model, tok)["methods"]["unedited"]["curve"]
    assert [p["edits"] for p in curve] == [0, 2, 4]
    assert isinstance(curve[0]["metrics"]["fluency"], float) and isinstance(curve[-1]["metrics"]["fluency"], float)
    assert isinstance(curve[1]["metrics"]["fluency"], float) == every_point
    assert curve[1]["metrics"]["efficacy"] is not None
