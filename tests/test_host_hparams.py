"""EasyEdit's own yaml files load unchanged and mean what they mean in the host: P_loc (a precomputed projector,
checked), fp16 and model_parallel (the loader), fields accepted but unused (logged once); a tokenizer without a
pad token works through BaseEditor."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (BUILDERS, FACTS, HOST_SOURCE, assert_weights_unchanged, build_llama, exact_hparams,
                      make_tokenizer, needs_host, weights_snapshot)

from alphaedit_plugin import (AlphaEditHyperParams, MEMITHyperParams, ProjectorMismatchError, apply_to_model,
                              create_state, hparams as hparams_module, state_identity)
from alphaedit_plugin.architectures import templates_for

HOST_HPARAMS = HOST_SOURCE / "hparams"
ALPHAEDIT_FILES = sorted((HOST_HPARAMS / "AlphaEdit").glob("*.yaml"))
MEMIT_FILES = sorted((HOST_HPARAMS / "MEMIT").glob("*.yaml"))
needs_host_files = pytest.mark.skipif(not ALPHAEDIT_FILES, reason=f"EasyEdit's hparams are not at {HOST_HPARAMS}")


@needs_host_files
@pytest.mark.parametrize("path", ALPHAEDIT_FILES, ids=lambda p: p.name)
def test_every_host_alphaedit_yaml_loads_unchanged(path):
    raw = yaml.safe_load(path.read_text())
    hparams = AlphaEditHyperParams.from_hparams(path)
    assert hparams.layers == raw["layers"] and hparams.P_loc == raw["P_loc"]
    assert hparams.nullspace_threshold == pytest.approx(float(raw["nullspace_threshold"]))
    assert hparams.rewrite_module_tmp == raw["rewrite_module_tmp"] and hparams.L2 == pytest.approx(float(raw["L2"]))


@needs_host_files
@pytest.mark.parametrize("path", MEMIT_FILES, ids=lambda p: p.name)
def test_every_host_memit_yaml_loads_into_the_plugins_memit(path):
    raw = yaml.safe_load(path.read_text())
    hparams = MEMITHyperParams.from_hparams(path)
    assert hparams.label == "MEMIT" and hparams.layers == raw["layers"]
    assert hparams.mom2_update_weight == pytest.approx(float(raw["mom2_update_weight"]))
    assert hparams.model_parallel == raw["model_parallel"]


@needs_host_files
def test_another_methods_file_or_an_unknown_field_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="alg_name must be 'AlphaEdit' for AlphaEditHyperParams, got 'MEMIT'"):
        AlphaEditHyperParams.from_hparams(MEMIT_FILES[0])
    config = yaml.safe_load(ALPHAEDIT_FILES[0].read_text())
    config["P_location"] = "./p.pt"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown field\(s\) \['P_location'\]"):
        AlphaEditHyperParams.from_hparams(path)


@needs_host_files
def test_fields_accepted_but_unused_are_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(hparams_module, "_LOGGED_UNUSED", set())
    with caplog.at_level(logging.INFO, logger="alphaedit_plugin.hparams"):
        AlphaEditHyperParams.from_hparams(ALPHAEDIT_FILES[0])
        AlphaEditHyperParams.from_hparams(ALPHAEDIT_FILES[1])
    said = [r.getMessage() for r in caplog.records if "accepted for EasyEdit compatibility" in r.getMessage()]
    assert len(said) == 1, said
    assert "mom2_adjustment" in said[0] and "mom2_update_weight" in said[0] and "layer_selection" in said[0]


# ---------------------------------------------------------------------------
# P_loc
# ---------------------------------------------------------------------------
def host_format_projector(tmp_path, arch, tok, **overrides):
    """P of the exact setting computed by the plugin, saved as EasyEdit saves it: (layers, d, d), torch.save."""
    model = BUILDERS[arch]()
    hparams = exact_hparams(tmp_path, arch, **overrides)
    state = create_state(model, tok, hparams)
    stacked = torch.stack([state.null_spaces[layer].projector for layer in hparams.layers])
    path = tmp_path / "null_space_project.pt"
    torch.save(stacked, path)
    return path, state, hparams


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_p_loc_is_used_and_gives_the_same_edit(tmp_path, arch, tokenizer):
    path, computed, hparams = host_format_projector(tmp_path, arch, tokenizer)
    from_file = exact_hparams(tmp_path, arch, P_loc=str(path), stats_dir=str(tmp_path / "no-stats-here"))
    models = {}
    for name, hp in (("computed", hparams), ("file", from_file)):
        models[name] = BUILDERS[arch]()
        state = create_state(models[name], tokenizer, hp)
        apply_to_model(models[name], tokenizer, FACTS[:1], hp, state=state)
        if name == "file":
            assert state.identity["projector_file"]["file"] == "null_space_project.pt"
            assert not (tmp_path / "no-stats-here").exists()  # nothing computed: no statistics were needed
            for layer in hp.layers:
                assert torch.equal(state.null_spaces[layer].projector, computed.null_spaces[layer].projector)
                assert state.null_spaces[layer].rank == computed.null_spaces[layer].rank
    for key, value in models["computed"].state_dict().items():
        assert torch.equal(value, models["file"].state_dict()[key]), key


def test_a_missing_p_loc_file_means_compute_it(tmp_path, tokenizer, caplog):
    model = BUILDERS["llama"]()
    hparams = exact_hparams(tmp_path, "llama", P_loc=str(tmp_path / "absent.pt"))
    with caplog.at_level(logging.INFO, logger="alphaedit_plugin.edit_loop"):
        state = create_state(model, tokenizer, hparams)
    assert "does not exist: P is computed" in caplog.text and "projector_file" not in state.identity
    assert not (tmp_path / "absent.pt").exists() and not Path("null_space_project.pt").exists()


@pytest.mark.parametrize("bad, message", [
    ("other_layers", r"holds a tensor of shape \(1, 96, 96\); this edit needs \(2, 96, 96\)"),
    ("other_width", r"holds a tensor of shape \(2, 64, 64\); this edit needs \(2, 96, 96\)"),
    ("not_symmetric", "slice 0 .* is not a symmetric idempotent projector"),
    ("not_idempotent", "slice 1 .* is not a symmetric idempotent projector"),
    ("not_a_tensor", "holds a dict, not a tensor"),
    ("pickled", "cannot be read as a tensor file without pickle"),
])
def test_a_bad_p_loc_file_is_refused_before_anything_changes(tmp_path, tokenizer, bad, message):
    path, _, _ = host_format_projector(tmp_path, "llama", tokenizer)
    p = torch.load(path, weights_only=True)
    broken = {"other_layers": lambda: p[:1], "other_width": lambda: torch.eye(64).expand(2, 64, 64).clone(),
              "not_symmetric": lambda: torch.stack([p[0] + torch.triu(torch.ones(96, 96), 1), p[1]]),
              "not_idempotent": lambda: torch.stack([p[0], 2 * p[1]]), "not_a_tensor": lambda: {"P": p},
              "pickled": lambda: _Unpicklable()}[bad]()
    torch.save(broken, path)
    model = BUILDERS["llama"]()
    snapshot = weights_snapshot(model)
    hparams = exact_hparams(tmp_path, "llama", P_loc=str(path))
    with pytest.raises(ProjectorMismatchError, match=message):
        apply_to_model(model, tokenizer, FACTS[:1], hparams)
    assert_weights_unchanged(model, snapshot)


class _Unpicklable:
    """An object torch.save pickles but weights_only loading refuses."""


def test_a_state_made_with_one_p_loc_file_is_refused_with_another(tmp_path, tokenizer):
    path, _, _ = host_format_projector(tmp_path, "llama", tokenizer)
    model = BUILDERS["llama"]()
    hparams = exact_hparams(tmp_path, "llama", P_loc=str(path))
    state = create_state(model, tokenizer, hparams)
    other = tmp_path / "other.pt"
    torch.save(torch.load(path, weights_only=True).flip(0).contiguous(), other)  # the layers' slices swapped
    with pytest.raises(Exception, match="projector_file"):
        state.check_compatible(state_identity(model, exact_hparams(tmp_path, "llama", P_loc=str(other)),
                                              templates_for(model, hparams)))


# ---------------------------------------------------------------------------
# The loader fields and the pad token, through the host
# ---------------------------------------------------------------------------
def test_fp16_and_model_parallel_act_as_in_the_hosts_loader(tmp_path, monkeypatch):
    import transformers

    from alphaedit_plugin.hosts.easyedit.registration import load_model_and_tokenizer

    folder = tmp_path / "model"
    build_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    model, _ = load_model_and_tokenizer(str(folder), AlphaEditHyperParams(layers=[1], fp16=True))
    assert next(model.parameters()).dtype == torch.float16
    calls, real = [], transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    model, _ = load_model_and_tokenizer(str(folder), AlphaEditHyperParams(layers=[1], model_parallel=True))
    assert calls[-1]["device_map"] == "auto" and next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 must be true or false"):
        AlphaEditHyperParams(layers=[1], fp16="yes")


def tokenizer_without_pad():
    tok = make_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    return tok


@needs_host
def test_a_pair_whose_tokenizer_has_no_pad_token_edits_through_base_editor(tmp_path, monkeypatch):
    from easyeditor import BaseEditor

    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory
    hparams = exact_hparams(tmp_path, "llama", device="cpu")
    tok = tokenizer_without_pad()
    hparams.model_name = (build_llama(), tok)
    editor = BaseEditor.from_hparams(hparams)
    assert tok.pad_token == tok.eos_token  # what the host's own loader sets
    metrics, _, _ = editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
                                sequential_edit=True)
    assert metrics[0]["post"]["rewrite_acc"][0] >= metrics[0]["pre"]["rewrite_acc"][0]

    own = make_tokenizer()
    own.pad_token = "Paris"  # a user's own choice is never changed
    hparams = exact_hparams(tmp_path, "llama", device="cpu")
    hparams.model_name = (build_llama(), own)
    BaseEditor.from_hparams(hparams)
    assert own.pad_token == "Paris"
