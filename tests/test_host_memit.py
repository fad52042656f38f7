"""``memit_steps: easyeditor``: the MEMIT family on the EasyEdit host's own compute_z / compute_ks.

The host tests run against the current EasyEdit source (../shared/hosts/EasyEdit) and skip, saying why,
without it; the hparams and missing-host checks always run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from conftest import (BUILDERS, FACTS, assert_weights_unchanged, make_tokenizer, needs_host, run_without_host,
                      use_smollm2_statistics, weights_snapshot, write_corpus)
from test_baselines_editing import baseline_hparams, make_state, preservation_with_and_without_p

from alphaedit_plugin import (EditError, MEMITHyperParams, PRUNEHyperParams, RECTHyperParams, apply_to_model,
                              compute_update, load_hparams, normalise_requests)
from alphaedit_plugin.architectures import templates_for


def host_variant(tmp_path, arch, method="MEMIT", projection=False, **overrides):
    return baseline_hparams(tmp_path, arch, method, projection, memit_steps="easyeditor", **overrides)


# ---------------------------------------------------------------------------
# Without the host
# ---------------------------------------------------------------------------
def test_memit_steps_is_validated_and_named_in_the_label(tmp_path):
    hparams = MEMITHyperParams(layers=[1], memit_steps="easyeditor", projection=True)
    assert hparams.label == "MEMIT@easyeditor+P"
    assert MEMITHyperParams(layers=[1], memit_steps="easyeditor").label == "MEMIT@easyeditor"
    assert RECTHyperParams(layers=[1], memit_steps="plugin", projection=True).label == "RECT+P"
    with pytest.raises(ValueError, match=r"memit_steps must be one of \('plugin', 'easyeditor'\), got 'host'"):
        PRUNEHyperParams(layers=[1], memit_steps="host").validate()


def test_without_the_host_the_error_says_what_to_install_and_nothing_changes(tmp_path):
    result = run_without_host(
        "import pytest\n"
        "from pathlib import Path\n"
        "from conftest import BUILDERS, FACTS, assert_weights_unchanged, make_tokenizer, weights_snapshot\n"
        "from test_baselines_editing import baseline_hparams\n"
        "from alphaedit_plugin import apply_to_model\n"
        "from alphaedit_plugin.hosts.easyedit.memit_steps import HostUnavailableError\n"
        "model, tok = BUILDERS['llama'](), make_tokenizer()\n"
        f"hparams = baseline_hparams(Path({str(tmp_path)!r}), 'llama', 'MEMIT', False, memit_steps='easyeditor')\n"
        "snapshot = weights_snapshot(model)\n"
        "with pytest.raises(HostUnavailableError, match='memit_steps: easyeditor needs the EasyEdit host package'):\n"
        "    apply_to_model(model, tok, FACTS, hparams)\n"
        "assert_weights_unchanged(model, snapshot)\n"
        "print('refused, weights unchanged')\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused, weights unchanged" in result.stdout


# ---------------------------------------------------------------------------
# On the real host
# ---------------------------------------------------------------------------
def host_execute_memit(model, tok, hparams, state, monkeypatch):
    """The host's own ``execute_memit`` (its whole MEMIT), fed our C0 and context prefixes through its caches."""
    from easyeditor.models.memit import memit_main

    from alphaedit_plugin.hosts.easyedit.memit_steps import host_hparams, host_request
    from alphaedit_plugin.hosts.easyedit.compat import host_step_call

    templates = templates_for(model, hparams)
    model_key = model.config._name_or_path.replace("/", "_")
    cov = {(model_key, templates.rewrite_module_tmp.format(l)): state.second_moments[l].float()
           for l in hparams.layers}
    monkeypatch.setattr(memit_main, "COV_CACHE", cov)
    monkeypatch.setattr(memit_main, "CONTEXT_TEMPLATES_CACHE", state.context_templates)
    requests = [host_request(r) for r in normalise_requests(FACTS)]
    with host_step_call(model, tok, hparams.device):
        deltas = memit_main.execute_memit(model, tok, requests, host_hparams(model, hparams, templates))
    return {l: (lambda adj_k, resid: resid @ adj_k.T)(*deltas[f"{templates.rewrite_module_tmp.format(l)}.weight"])
            for l in hparams.layers}


@needs_host
def test_unprojected_is_the_hosts_own_memit(tmp_path, arch, tokenizer, monkeypatch):
    """Same weights, statistics and prefixes: the edit loop's deltas equal the host's execute_memit's."""
    model = BUILDERS[arch]()
    hparams = host_variant(tmp_path, arch, mom2_update_weight=3.0)
    state = make_state(model, tokenizer, hparams, tmp_path)
    snapshot = weights_snapshot(model)
    ours = compute_update(model, tokenizer, normalise_requests(FACTS), hparams, state)
    assert_weights_unchanged(model, snapshot)
    host = host_execute_memit(model, tokenizer, hparams, state, monkeypatch)
    assert_weights_unchanged(model, snapshot)
    for layer in hparams.layers:
        expected = host[layer].float()
        assert expected.abs().max() > 0
        assert torch.allclose(ours.deltas[layer], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()), layer


@needs_host
def test_host_steps_are_the_ones_called(tmp_path, tokenizer, monkeypatch):
    from easyeditor.models.memit import compute_ks, compute_z

    calls = {"compute_z": 0, "compute_ks": 0}
    for module, name in ((compute_z, "compute_z"), (compute_ks, "compute_ks")):
        original = getattr(module, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    model = BUILDERS["llama"]()
    hparams = host_variant(tmp_path, "llama", projection=True)
    apply_to_model(model, tokenizer, FACTS, hparams, state=make_state(model, tokenizer, hparams, tmp_path))
    assert calls == {"compute_z": len(FACTS), "compute_ks": len(hparams.layers)}


@needs_host
@pytest.mark.parametrize("method", ["MEMIT", "PRUNE", "RECT"])
def test_projected_host_variant_preserves_k0_and_unprojected_does_not(tmp_path, arch, tokenizer, method):
    ratios = preservation_with_and_without_p(tmp_path, arch, tokenizer, method, memit_steps="easyeditor")
    assert max(ratios[True].values()) < 1e-5, ratios
    assert min(ratios[False].values()) > 1e-2, ratios


@needs_host
def test_projected_host_variant_carries_earlier_keys(tmp_path, tokenizer):
    """Sequential use: Kp Kpᵀ grows by each call's K1 K1ᵀ, and the second solve sees the first call's keys."""
    model = BUILDERS["llama"]()
    hparams = host_variant(tmp_path, "llama", projection=True)
    state = make_state(model, tokenizer, hparams, tmp_path)
    apply_to_model(model, tokenizer, FACTS[:1], hparams, state=state)
    first = {l: v.clone() for l, v in state.earlier_keys_kkt_sum.items()}
    assert all(v.abs().sum() > 0 for v in first.values())
    apply_to_model(model, tokenizer, FACTS[1:], hparams, state=state)
    assert state.edits_applied == len(FACTS) and len(state.edit_log) == 2
    assert all(torch.linalg.matrix_rank(state.earlier_keys_kkt_sum[l]) > torch.linalg.matrix_rank(first[l])
               for l in hparams.layers)


@needs_host
def test_host_calls_leave_no_trace(tmp_path, tokenizer, capsys):
    """The host's prints go to the log; its padding side and requires_grad changes are undone."""
    model = BUILDERS["gpt2"]()
    tokenizer.padding_side = "left"
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(flags.values())
    hparams = host_variant(tmp_path, "gpt2", projection=True)
    apply_to_model(model, tokenizer, FACTS[:1], hparams, state=make_state(model, tokenizer, hparams, tmp_path))
    assert capsys.readouterr().out == ""
    assert tokenizer.padding_side == "left"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert torch.zeros(1).to("cpu").device.type == "cpu"  # no device patch left behind
    with pytest.raises(RuntimeError):
        torch.zeros(1, device="cuda:cpu")


@needs_host
def test_a_failing_host_step_leaves_weights_and_state_as_they_were(tmp_path, tokenizer, monkeypatch):
    from easyeditor.models.memit import compute_ks

    model = BUILDERS["llama"]()
    hparams = host_variant(tmp_path, "llama", projection=True)
    state = make_state(model, tokenizer, hparams, tmp_path)
    apply_to_model(model, tokenizer, FACTS[:1], hparams, state=state)
    snapshot, kept = weights_snapshot(model), {l: v.clone() for l, v in state.earlier_keys_kkt_sum.items()}
    calls = []

    def second_layer_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("host failure in the second layer")
        return original(*args, **kwargs)

    original = compute_ks.compute_ks
    monkeypatch.setattr(compute_ks, "compute_ks", second_layer_fails)
    with pytest.raises(EditError, match="host failure in the second layer"):
        apply_to_model(model, tokenizer, FACTS[1:], hparams, state=state)
    assert_weights_unchanged(model, snapshot)
    assert all(torch.equal(state.earlier_keys_kkt_sum[l], kept[l]) for l in hparams.layers)
    assert state.edits_applied == 1


@needs_host
def test_base_editor_runs_the_host_step_variants(tmp_path, monkeypatch):
    """Selected by the yaml alone, through the host's BaseEditor (CPU)."""
    from easyeditor import BaseEditor

    from alphaedit_plugin.hosts import easyedit as be

    be.register()
    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory
    for projection in (False, True):
        config = {"alg_name": "MEMIT", "projection": projection, "memit_steps": "easyeditor", "layers": [1, 2],
                  "v_num_grad_steps": 10, "v_lr": 0.5, "clamp_norm_factor": 10, "v_weight_decay": 1e-3, "L2": 0.1,
                  "nullspace_threshold": 0.5, "mom2_update_weight": 1.0,
                  "mom2_dataset": write_corpus(tmp_path / "corpus.txt"), "mom2_n_samples": 60,
                  "stats_dir": str(tmp_path / "stats"), "context_template_count": 2, "context_template_length": 3,
                  "device": "cpu"}
        path = tmp_path / f"memit-host-{projection}.yaml"
        path.write_text(yaml.safe_dump(config))
        hparams = load_hparams(path)
        model, tok = BUILDERS["llama"](), make_tokenizer()
        hparams.model_name = (model, tok)
        editor = BaseEditor.from_hparams(hparams)
        layer = editor.model.get_submodule("model.layers.1.mlp.down_proj")
        before = layer.weight.detach().clone()
        # The current host keeps an edit in the model only with sequential_edit=True (else it restores the weights).
        keeps = {"sequential_edit": True} if be.inspect_host().has_sequential_edit else {}
        editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"], **keeps)
        assert not torch.equal(layer.weight, before)
        state = be.get_state(editor.model, hparams)
        assert state is not None and state.identity["method"] == hparams.label
        be.reset_state(editor)


@needs_host
@pytest.mark.real_model
def test_smollm2_host_memit_with_p_through_base_editor(tmp_path, monkeypatch, smollm2_stats_dir):
    """The real model through the host: MEMIT@easyeditor+P from its shipped yaml makes the edit hold."""
    from pathlib import Path

    from easyeditor import BaseEditor

    from alphaedit_plugin.hosts import easyedit as be

    models = pytest.importorskip("alphaedit_plugin.models", reason="alphaedit_plugin.models is not available")
    try:
        model, tok = models.load_smollm2()
    except Exception as error:  # the wheel is not installed: say so
        pytest.skip(f"SmolLM2 not available: {type(error).__name__}: {error}")
    monkeypatch.chdir(tmp_path)
    be.register()
    root = Path(__file__).resolve().parents[1]
    hparams = load_hparams(root / "hparams" / "MEMIT" / "smollm2-135m-easyeditor-projected.yaml")
    assert hparams.label == "MEMIT@easyeditor+P"
    use_smollm2_statistics(hparams, smollm2_stats_dir)
    hparams.model_name = (model, tok)
    editor = BaseEditor.from_hparams(hparams)
    metrics, _, _ = editor.edit(prompts=["The Eiffel Tower is located in the city of"], target_new=["Rome"],
                                subject=["Eiffel Tower"])
    assert metrics[0]["post"]["rewrite_acc"][0] > metrics[0]["pre"]["rewrite_acc"][0]
    assert metrics[0]["post"]["rewrite_acc"][0] >= 0.99
    state = be.get_state(editor.model, hparams)
    assert state is not None and state.identity["method"] == "MEMIT@easyeditor+P"
