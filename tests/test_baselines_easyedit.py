"""MEMIT, PRUNE and RECT (with and without P) in the real EasyEdit host's registry. CPU, tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from conftest import require_host
import torch
import yaml

easyeditor = require_host()

from conftest import build_llama, make_tokenizer, write_corpus  # noqa: E402
from easyeditor import BaseEditor  # noqa: E402
from easyeditor.editors.batch_editor import BatchEditor  # noqa: E402
from easyeditor.util.alg_dict import ALG_DICT  # noqa: E402

from alphaedit_plugin import load_hparams  # noqa: E402
from alphaedit_plugin.hosts import easyedit as be  # noqa: E402
from alphaedit_plugin.hosts.easyedit import inspect_host  # noqa: E402

LEGACY = inspect_host().restores_only_kept_weights


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host writes logs/run.log into the working directory
    be.register()


def write_yaml(tmp_path, method, projection, **overrides) -> str:
    config = {"alg_name": method, "projection": projection, "layers": [1, 2], "v_num_grad_steps": 20, "v_lr": 0.5,
              "clamp_norm_factor": 10, "v_weight_decay": 1e-3, "L2": 0.1, "nullspace_threshold": 0.5,
              "mom2_update_weight": 1.0, "mom2_dataset": write_corpus(tmp_path / "corpus.txt"),
              "mom2_n_samples": 60, "stats_dir": str(tmp_path / "stats"), "context_template_count": 2,
              "context_template_length": 3, "device": "cpu", "batch_size": 1}
    config.update(overrides)
    path = tmp_path / f"{method}-{projection}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_registered_and_idempotent():
    first = be.register()
    assert be.register() == first
    assert all(ALG_DICT[name] is entry for name, entry in first.items())
    assert be.is_registered()
    assert BatchEditor.is_batchable_method("PRUNE") and BatchEditor.is_batchable_method("RECT")
    assert BatchEditor.is_batchable_method("MEMIT")


def test_host_memit_hparams_still_reach_the_host(monkeypatch):
    """The host's own MEMIT keeps working for the host's hparams: the dispatcher passes them on unchanged."""
    from easyeditor import MEMITHyperParams as HostMEMITHyperParams

    dispatcher = ALG_DICT["MEMIT"]
    assert dispatcher.host_apply is not None
    calls = []
    monkeypatch.setattr(dispatcher, "host_apply", lambda *a, **k: calls.append((a, k)) or ("model", {}))
    host_hparams = object.__new__(HostMEMITHyperParams)
    assert dispatcher("m", "t", [], host_hparams, copy=False) == ("model", {})
    assert calls and calls[0][0][3] is host_hparams
    with pytest.raises(TypeError, match="load_hparams"):
        ALG_DICT["PRUNE"]("m", "t", [], host_hparams)


def test_unregister_restores_the_host_entries():
    host_memit = ALG_DICT["MEMIT"].host_apply
    assert be.unregister() is True
    assert ALG_DICT["MEMIT"] is host_memit
    assert "PRUNE" not in ALG_DICT and "RECT" not in ALG_DICT
    assert be.unregister() is False
    be.register()
    assert be.is_registered()


@pytest.mark.parametrize("method", ["MEMIT", "PRUNE", "RECT"])
@pytest.mark.parametrize("projection", [False, True])
def test_base_editor_runs_each_variant_sequentially(tmp_path, method, projection):
    hparams = load_hparams(write_yaml(tmp_path, method, projection))
    model, tok = build_llama(), make_tokenizer()
    hparams.model_name = (model, tok)
    editor = BaseEditor.from_hparams(hparams)
    layer = editor.model.get_submodule(f"model.layers.{hparams.layers[0]}.mlp.down_proj")
    before = layer.weight.detach().clone()
    extra = {} if LEGACY else {"sequential_edit": True}
    editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"], **extra)
    editor.edit(prompts=["The river of Japan"], target_new=["Nile"], subject=["Japan"], **extra)
    assert not torch.equal(layer.weight, before)
    state = be.get_state(editor.model, hparams)
    assert state is not None and state.edits_applied == 2 and state.method == hparams.label
    assert be.reset_state(editor)
