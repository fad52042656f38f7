"""The current EasyEdit source (../shared/hosts/EasyEdit): edit(sequential_edit=...), batch_edit, and its own
AlphaEdit kept beside the plugin's. In-process, as its users run it (the source on sys.path)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import HOST_SOURCE, build_llama, make_tokenizer, require_host, write_corpus

easyeditor = require_host()

from easyeditor import BaseEditor  # noqa: E402
from easyeditor.util.alg_dict import ALG_DICT  # noqa: E402

import alphaedit_plugin.hosts.easyedit as ee  # noqa: E402
from alphaedit_plugin import AlphaEditHyperParams  # noqa: E402

pytestmark = pytest.mark.skipif(not ee.inspect_host().has_sequential_edit,
                                reason="the importable easyeditor is not the current source (no sequential_edit)")


@pytest.fixture
def editor_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory

    def make(batch_size=1):
        hp = AlphaEditHyperParams(layers=[1, 2], v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=10,
                                  v_weight_decay=1e-3, L2=0.1, nullspace_threshold=0.5,
                                  mom2_dataset=write_corpus(tmp_path / "corpus.txt"), mom2_n_samples=60,
                                  stats_dir=str(tmp_path / "stats"), context_template_count=2,
                                  context_template_length=3, batch_size=batch_size, device="cpu")
        hp.model_name = (build_llama(), make_tokenizer())
        return BaseEditor.from_hparams(hp), hp

    return make


def top(editor, prompt):
    ids = torch.tensor([editor.tok(prompt)["input_ids"]])
    with torch.no_grad():
        return editor.tok.convert_ids_to_tokens(int(editor.model(input_ids=ids).logits[0, -1].argmax()))


def test_the_hosts_own_alphaedit_is_kept_behind_the_dispatcher():
    from easyeditor.models.alphaedit import apply_AlphaEdit_to_model

    dispatcher = ALG_DICT["AlphaEdit"]
    assert os.path.realpath(easyeditor.__file__).startswith(os.path.realpath(HOST_SOURCE))
    assert dispatcher.host_apply is apply_AlphaEdit_to_model
    ee.register()
    assert ALG_DICT["AlphaEdit"] is dispatcher


def test_sequential_edit_false_restores_and_true_keeps(editor_for):
    editor, hp = editor_for()
    loc = {"neighborhood": {"prompt": ["The capital of Spain"], "ground_truth": ["Madrid"]}}
    m, _, _ = editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
                          rephrase_prompts=["A capital of France"], locality_inputs=loc, sequential_edit=False)
    assert m[0]["post"]["rewrite_acc"] == [1.0]
    assert top(editor, "The capital of France") != "Rome"  # the host restored the weights
    assert ee.get_state(editor.model, hp).edits_applied == 0  # ... and the state took the edit out again
    m, _, _ = editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
                          locality_inputs=loc, sequential_edit=True)
    editor.edit(prompts=["The language of Italy"], target_new=["German"], subject=["Italy"], sequential_edit=True)
    assert top(editor, "The capital of France") == "Rome"
    assert top(editor, "The language of Italy") == "German"
    assert ee.get_state(editor.model, hp).edits_applied == 2
    assert "neighborhood_acc" in sorted(m[0]["post"]["locality"])


def test_batch_edit(editor_for):
    editor, hp = editor_for(batch_size=2)
    m, _, _ = editor.batch_edit(prompts=["The capital of France", "The river of Japan"], target_new=["Rome", "Nile"],
                                subject=["France", "Japan"], sequential_edit=True)
    assert [x["post"]["rewrite_acc"] for x in m] == [[1.0], [1.0]]
    assert ee.get_state(editor.model, hp).edits_applied == 2


@pytest.mark.parametrize("keep_original_weight", [True, False])
@pytest.mark.parametrize("sequential_edit", [True, False])
def test_keep_original_weight_is_the_hosts_to_ignore(editor_for, keep_original_weight, sequential_edit):
    """The current host decides with sequential_edit alone (it passes keep_original_weight=False to every editor);
    the plugin's state follows what the host did to the weights."""
    editor, hp = editor_for()
    editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
                keep_original_weight=keep_original_weight, sequential_edit=sequential_edit)
    kept = top(editor, "The capital of France") == "Rome"
    assert kept == sequential_edit
    assert ee.get_state(editor.model, hp).edits_applied == (1 if sequential_edit else 0)


def test_the_hosts_own_alphaedit_still_edits_for_its_own_hparams(tmp_path, monkeypatch):
    """EasyEdit's AlphaEdit, loaded with EasyEdit's hparams class, runs unchanged behind the dispatcher (given a
    projector file, so that it computes no Wikipedia statistics), while the plugin is registered."""
    from easyeditor import AlphaEditHyperParams as HostAlphaEditHyperParams
    from easyeditor.models.alphaedit import AlphaEdit_main

    from conftest import exact_hparams

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "tiny-llama"  # the host picks its loader by "llama" in the path
    build_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    ours = exact_hparams(tmp_path, "llama")
    projector = torch.stack([torch.eye(96)] * 2)  # P = I: AlphaEdit's solve without a constraint
    torch.save(projector, tmp_path / "null_space_project.pt")
    for name, value in (("P", None), ("P_loaded", False), ("cache_c", None), ("cache_c_new", False)):
        monkeypatch.setattr(AlphaEdit_main, name, value, raising=False)  # the host keeps these as module globals
    host = HostAlphaEditHyperParams(
        layers=[1, 2], layer_selection="all", fact_token="subject_last", v_num_grad_steps=10, v_lr=0.5,
        v_loss_layer=3, v_weight_decay=1e-3, clamp_norm_factor=10, kl_factor=0.0625, mom2_adjustment=True,
        mom2_update_weight=1.0, rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm",
        lm_head_module="lm_head", mom2_dataset=ours.mom2_dataset, mom2_n_samples=10, mom2_dtype="float32",
        nullspace_threshold=0.5, L2=0.1, alg_name="AlphaEdit", device="cpu", model_name=str(folder),
        stats_dir=str(tmp_path / "host-stats"), P_loc=str(tmp_path / "null_space_project.pt"))
    calls = []
    original = ALG_DICT["AlphaEdit"].host_apply
    monkeypatch.setattr(ALG_DICT["AlphaEdit"], "host_apply", lambda *a, **k: calls.append(1) or original(*a, **k))
    editor = BaseEditor.from_hparams(host)
    layer = editor.model.get_submodule("model.layers.2.mlp.down_proj")
    before = layer.weight.detach().clone()
    editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"], sequential_edit=True)
    assert calls == [1] and not torch.equal(layer.weight, before)
    assert ee.get_state(editor.model, ours) is None  # the plugin kept no state: it did not edit
