"""The benchmark scripts are presets of alphaedit-bench: their flags become the runner's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
