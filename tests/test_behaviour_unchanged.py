"""Every method's per-layer updates over two sequential batches, against a recording made before the code moved.

``fixtures/edit_updates.safetensors`` holds, for tiny GPT-2 (Conv1D) and tiny Llama (Linear), each method's
update of each edited layer after each of two sequential batches (FACTS[:2], then FACTS[2:]), recorded with
the code as it was before the edit loop was unified (commit d7af618). A refactor must reproduce them to float
rounding (``conftest.assert_matches_recording``). Regenerate only for an intended change of behaviour:
``python tests/test_behaviour_unchanged.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUILDERS, FACTS, assert_matches_recording, make_hparams, make_tokenizer, write_corpus

from alphaedit_plugin import (AlphaEditHyperParams, MEMITHyperParams, PRUNEHyperParams, RECTHyperParams,
                              apply_to_model, create_state)
from alphaedit_plugin.architectures import get_module, templates_for, weight_as_out_in
from alphaedit_plugin.layer_statistics import load_second_moments

FIXTURE = Path(__file__).parent / "fixtures" / "edit_updates.safetensors"
CLASSES = {"MEMIT": MEMITHyperParams, "PRUNE": PRUNEHyperParams, "RECT": RECTHyperParams}
SHARED = ("layers", "v_num_grad_steps", "v_lr", "clamp_norm_factor", "v_weight_decay", "L2", "nullspace_threshold",
          "mom2_dataset", "mom2_n_samples", "stats_dir", "context_template_count", "context_template_length",
          "model_name", "mom2_dtype", "mom2_heldout_fraction")
PLUGIN_STEPS = {
    "AlphaEdit": ("AlphaEdit", {}),
    "MEMIT": ("MEMIT", {"projection": False}),
    "MEMIT+P": ("MEMIT", {"projection": True}),
    "MEMIT+P+λC0": ("MEMIT", {"projection": True, "projection_keeps_mom2_term": True}),
    "PRUNE": ("PRUNE", {"projection": False, "prune_log_base": 1.5}),
    "PRUNE+P": ("PRUNE", {"projection": True, "prune_log_base": 1.5}),
    "RECT": ("RECT", {"projection": False}),
    "RECT+P": ("RECT", {"projection": True}),
    "RECT+P(project_then_sparsify)": ("RECT", {"projection": True, "rect_projection_order": "project_then_sparsify"}),
}
HOST_STEPS = {
    label.replace("+P", "") + "@easyeditor" + ("+P" if label.endswith("+P") else ""):
        (alg, {**fields, "memit_steps": "easyeditor"})
    for label, (alg, fields) in PLUGIN_STEPS.items() if label in ("MEMIT", "MEMIT+P", "PRUNE", "PRUNE+P", "RECT", "RECT+P")
}
BATCHES = [FACTS[:2], FACTS[2:]]
HAS_HOST = importlib.util.find_spec("easyeditor") is not None


def layer_weights(model, hparams):
    templates = templates_for(model, hparams)
    return {layer: weight_as_out_in(get_module(model, templates.rewrite_module_tmp.format(layer))).detach().clone()
            for layer in hparams.layers}


def replay(tmp_path: Path, arch: str, label: str, alg: str, fields: dict) -> dict:
    """``{"<arch>/<label>/batch<b>/layer<l>": update}`` for the two batches, each edited on top of the last."""
    tok = make_tokenizer()
    model = BUILDERS[arch]()
    base = make_hparams(tmp_path, arch, n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0)
    shared = {name: getattr(base, name) for name in SHARED}
    if alg == "AlphaEdit":
        hparams = AlphaEditHyperParams(**shared)
        state = create_state(model, tok, hparams)
    else:
        hparams = CLASSES[alg](**shared, mom2_update_weight=2.0, **fields)
        state = create_state(model, tok, hparams)
        # MEMIT's C0 from a 40-line corpus (the 4-line one that gives the exact null space is singular).
        broad = type(hparams)(**{**shared, "mom2_dataset": write_corpus(tmp_path / "broad.txt", 40)})
        state.second_moments = load_second_moments(model, tok, broad, templates_for(model, broad))
    updates = {}
    for number, batch in enumerate(BATCHES):
        before = layer_weights(model, hparams)
        apply_to_model(model, tok, batch, hparams, state=state)
        after = layer_weights(model, hparams)
        for layer in hparams.layers:
            updates[f"{arch}/{label}/batch{number}/layer{layer}"] = after[layer] - before[layer]
    return updates


def recorded() -> dict:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE))


CASES = [(arch, label) for arch in ("gpt2", "llama") for label in list(PLUGIN_STEPS) + list(HOST_STEPS)]


@pytest.mark.parametrize("arch,label", CASES, ids=[f"{a}-{l}" for a, l in CASES])
def test_updates_match_the_recording(tmp_path, arch, label):
    if label in HOST_STEPS and not HAS_HOST:
        pytest.skip("the host-step variants need the EasyEdit host (easyeditor), absent here")
    alg, fields = {**PLUGIN_STEPS, **HOST_STEPS}[label]
    expected = {key: value for key, value in recorded().items() if key.startswith(f"{arch}/{label}/")}
    assert len(expected) == 4, sorted(expected)
    actual = replay(tmp_path, arch, label, alg, fields)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].norm() > 0, key
        assert_matches_recording(actual[key], value, msg=key)


if __name__ == "__main__":
    import tempfile

    from safetensors.torch import save_file

    torch.set_num_threads(1)
    result = {}
    for arch, label in CASES:
        with tempfile.TemporaryDirectory() as folder:
            result.update(replay(Path(folder), arch, label, *{**PLUGIN_STEPS, **HOST_STEPS}[label]))
    save_file({k: v.float().contiguous() for k, v in result.items()}, str(FIXTURE))
    sys.exit(0)
