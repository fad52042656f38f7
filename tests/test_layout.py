"""The package's layout: imports form no cycle, each equation of the paper has its file, and every method is a
registered part of the one edit loop (a toy method registers with one call and runs everywhere)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch
import yaml
from conftest import FACTS, build_llama, make_hparams, make_tokenizer, needs_host, weights_snapshot
from toy_methods import HalfStepHyperParams, as_toy, registered

import alphaedit_plugin
from alphaedit_plugin import apply_to_model, create_state, registry

PACKAGE = Path(alphaedit_plugin.__file__).parent
DEPRECATED_ALIASES = {"alphaedit_plugin.easyedit", "alphaedit_plugin.baselines"}  # re-export only


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("alphaedit_plugin"):
                continue
            for alias in node.names:  # `from . import x` names a module; `from .m import f` names m
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {module for module in found if module in known and module != name}


def graph() -> Dict[str, Set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()
            if name not in DEPRECATED_ALIASES}


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for other in sorted(edges.get(node, ())):
            if other not in edges:
                continue
            if state.get(other) == 1:
                return stack[stack.index(other):] + [other]
            if other not in state:
                cycle = visit(other)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_imports_form_no_cycle():
    edges = graph()
    # Package __init__ files import their submodules to export names; a submodule importing its package's
    # __init__ would close a loop, so those edges count as well. The root __init__ registers the methods and
    # the EasyEdit host: nothing below it may import it.
    cycle = find_cycle(edges)
    assert not cycle, " -> ".join(cycle)
    importing_root = sorted(name for name, targets in edges.items() if "alphaedit_plugin" in targets)
    assert importing_root == [], importing_root


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_steps_do_not_know_the_methods_or_hosts():
    edges = graph()
    shared = ["requests", "tracing", "context_templates", "prefix_cache", "compute_keys", "compute_targets",
              "corpus", "second_moment", "cache", "null_space_projector", "constrained_solve", "layer_spreading",
              "layer_statistics", "state", "architectures", "hparams", "errors"]
    for step in shared:
        targets = edges[f"alphaedit_plugin.{step}"]
        outward = sorted(t for t in targets if t.startswith(("alphaedit_plugin.methods", "alphaedit_plugin.hosts",
                                                              "alphaedit_plugin.bench", "alphaedit_plugin.edit_loop")))
        assert not outward, (step, outward)


@pytest.mark.parametrize("file, equation", [
    ("null_space_projector.py", "P = Û Ûᵀ"),
    ("constrained_solve.py", "Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + λ I)⁻¹"),
    ("layer_spreading.py", "Eq. 20"),
    ("methods/memit/method.py", "Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹"),
    ("methods/prune/restraint.py", "F(σ) = log_α(σ) − log_α(σ̄) + σ̄"),
    ("methods/rect/sparsify.py", "|Δ_ij| / |W_ij|"),
    ("second_moment.py", "K0K0ᵀ"),
    ("compute_targets.py", "v = h + δ"),
])
def test_each_equation_is_in_the_file_named_for_it(file, equation):
    assert equation in (PACKAGE / file).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# A method added by a user: one class pair and one call
# ---------------------------------------------------------------------------
def test_a_taken_name_and_bad_parts_are_refused():
    from alphaedit_plugin.methods.alphaedit import AlphaEdit, AlphaEditHyperParams

    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("AlphaEdit", AlphaEditHyperParams, AlphaEdit)
    with pytest.raises(ValueError, match="ALG_NAME 'HalfStep', not 'Other'"):
        registry.register_method("Other", HalfStepHyperParams, AlphaEdit)
    with pytest.raises(TypeError, match="EditMethod"):
        registry.register_method("HalfStep", HalfStepHyperParams, object)
    with pytest.raises(ValueError, match="without '\\+'"):
        registry.register_method("Half+Step", HalfStepHyperParams, AlphaEdit)
    assert "HalfStep" not in registry.labels()


def test_a_registered_toy_method_runs_through_the_edit_loop_and_leaves_again(tmp_path):
    model, tok = build_llama(), make_tokenizer()
    base = make_hparams(tmp_path, "llama", n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0)
    with registered("HalfStep"):
        assert "HalfStep" in registry.labels()
        hparams = as_toy(base, HalfStepHyperParams, step_fraction=0.5)
        full, half = build_llama(), model
        alpha_state = create_state(full, tok, base)
        apply_to_model(full, tok, FACTS[:1], base, state=alpha_state)
        before = weights_snapshot(half)
        state = create_state(half, tok, hparams)
        apply_to_model(half, tok, FACTS[:1], hparams, state=state)
        assert state.method == "HalfStep" and state.edits_applied == 1
        for layer in base.layers:
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            alpha_delta = full.state_dict()[name] - before[name]
            torch.testing.assert_close(half.state_dict()[name] - before[name], 0.5 * alpha_delta)
        path = tmp_path / "halfstep.yaml"
        path.write_text(yaml.safe_dump({**hparams.to_dict(), "step_fraction": 0.25}))
        loaded = registry.load_hparams(path)
        assert type(loaded) is HalfStepHyperParams and loaded.step_fraction == 0.25
    assert "HalfStep" not in registry.labels()
    with pytest.raises(ValueError, match="alg_name must be one of"):
        registry.load_hparams(path)


def test_a_registered_toy_method_runs_in_the_benchmark(tmp_path):
    from alphaedit_plugin.bench import BenchConfig, MethodOptions, available_methods, run_benchmark

    fixtures = Path(__file__).parent / "fixtures"
    model, tok = build_llama(), make_tokenizer()
    base = make_hparams(tmp_path, "llama", n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0,
                        v_num_grad_steps=8)
    with registered("HalfStep"):
        assert "HalfStep" in available_methods()
        config = BenchConfig(methods=["HalfStep"], dataset=str(fixtures / "counterfact_flat.json"), edits=2,
                             batch_size=2, output=str(tmp_path / "run"), model_name="tiny-llama", plots=False,
                             method_options={"HalfStep": MethodOptions(hparams=as_toy(base, HalfStepHyperParams))})
        results = run_benchmark(config, model, tok)
        assert results["methods"]["HalfStep"]["settings"]["hparams"]["step_fraction"] == 0.5
        assert [p["edits"] for p in results["methods"]["HalfStep"]["curve"]] == [0, 2]
    assert "HalfStep" not in available_methods()


@needs_host
def test_a_registered_toy_method_runs_through_base_editor(tmp_path, monkeypatch):
    from easyeditor import BaseEditor
    from easyeditor.util.alg_dict import ALG_DICT

    import alphaedit_plugin.hosts.easyedit as ee

    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory
    ee.register()
    base = make_hparams(tmp_path, "llama", n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0)
    with registered("HalfStep"):
        assert getattr(ALG_DICT["HalfStep"], "__alphaedit_plugin_patch__", False)  # registered in the host too
        hparams = as_toy(base, HalfStepHyperParams, device="cpu")
        hparams.model_name = (build_llama(), make_tokenizer())
        editor = BaseEditor.from_hparams(hparams)
        layer = editor.model.get_submodule("model.layers.1.mlp.down_proj")
        before = layer.weight.detach().clone()
        metrics, _, _ = editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
                                    sequential_edit=True)
        assert not torch.equal(layer.weight, before) and "post" in metrics[0]
        assert ee.get_state(editor.model, hparams).method == "HalfStep"
    assert "HalfStep" not in ALG_DICT
