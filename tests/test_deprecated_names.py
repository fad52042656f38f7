"""Names users called before the one-editor layout keep working, with a DeprecationWarning where they moved."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from conftest import BUILDERS, FACTS, exact_hparams, make_tokenizer

import alphaedit_plugin


def fresh_import(name):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_top_level_names_still_exist():
    for name in ("AlphaEditHyperParams", "AlphaEditState", "AlphaEditUpdate", "apply_alphaedit_to_model",
                 "create_state", "execute_alphaedit", "edit_in_place", "normalise_requests", "EditError"):
        assert hasattr(alphaedit_plugin, name), name
    assert alphaedit_plugin.AlphaEditState is alphaedit_plugin.EditingState


def test_the_easyedit_module_moved_and_reset_state_still_works():
    with pytest.warns(DeprecationWarning, match="alphaedit_plugin.hosts.easyedit"):
        old = fresh_import("alphaedit_plugin.easyedit")
    from alphaedit_plugin.hosts import easyedit as new

    assert old.reset_state is new.reset_state and old.get_state is new.get_state
    model = BUILDERS["llama"]()
    model.__dict__["_alphaedit_plugin_session"] = object()  # where an earlier version kept AlphaEdit's state
    assert old.reset_state(model) is True and "_alphaedit_plugin_session" not in model.__dict__


def test_the_baselines_package_moved_and_its_names_still_edit(tmp_path):
    with pytest.warns(DeprecationWarning, match="alphaedit_plugin.baselines is deprecated"):
        baselines = fresh_import("alphaedit_plugin.baselines")
    tok, model = make_tokenizer(), BUILDERS["llama"]()
    shared = exact_hparams(tmp_path, "llama")
    fields = {name: getattr(shared, name) for name in ("layers", "v_num_grad_steps", "v_lr", "L2", "mom2_dataset",
                                                      "mom2_n_samples", "stats_dir", "nullspace_threshold",
                                                      "mom2_dtype", "mom2_heldout_fraction", "model_name",
                                                      "context_template_count", "context_template_length")}
    hparams = baselines.MEMITHyperParams(**fields, projection=True)
    state = baselines.create_baseline_state(model, tok, hparams)
    before = model.get_submodule("model.layers.1.mlp.down_proj").weight.detach().clone()
    baselines.apply_baseline_to_model(model, tok, FACTS[:1], hparams, state=state)
    assert not torch.equal(model.get_submodule("model.layers.1.mlp.down_proj").weight, before)
    assert isinstance(state, baselines.BaselineState) and state.method == "MEMIT+P"
