"""Bad input gives a clear error that names what is wrong, and leaves every weight exactly as it was."""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BUILDERS, FACTS, assert_weights_unchanged, exact_hparams, make_hparams, weights_snapshot
from alphaedit_plugin import (
    AlphaEditHyperParams,
    EditError,
    RequestError,
    StateMismatchError,
    apply_alphaedit_to_model,
    create_state,
)
from alphaedit_plugin import edit_loop
from alphaedit_plugin.architectures import ARCHITECTURES, TEMPLATE_FIELDS, UnknownArchitectureError
from alphaedit_plugin.null_space_projector import NullSpaceError
from alphaedit_plugin.tracing import subject_token_index

REPO = Path(__file__).resolve().parents[1]
WRONG_MODULE = {"gpt2": "transformer.h.{}.mlp.nope", "llama": "model.layers.{}.mlp.nope"}
NOT_A_LINEAR = {"gpt2": "transformer.h.{}.mlp", "llama": "model.layers.{}.mlp"}


@pytest.fixture
def model(arch):
    return BUILDERS[arch]()


def refused(model, tok, requests, hparams, error, state=None, **kwargs):
    """Run an edit that must fail; check the weights are bit-identical afterwards; return the message."""
    snapshot = weights_snapshot(model)
    with pytest.raises(error) as caught:
        apply_alphaedit_to_model(model, tok, requests, hparams, state=state, **kwargs)
    assert_weights_unchanged(model, snapshot)
    return str(caught.value)


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("request_, field", [
    ({"prompt": "The capital of France", "subject": "Germany", "target_new": "Rome"}, "subject"),
    ({"prompt": "The capital of France", "subject": "France", "target_new": ""}, "target_new"),
    ({"prompt": "The capital of France", "subject": "France", "target_new": "   "}, "target_new"),
    ({"prompt": "The capital of France", "subject": "France", "target_new": 7}, "target_new"),
    ({"prompt": "The capital of France", "subject": "France", "target_new": ["Rome"]}, "target_new"),
    ({"prompt": "The capital of France", "subject": "France", "target_new": {"text": "Rome"}}, "target_new"),
    ({"prompt": "The capital of France", "subject": "France"}, "target_new"),
    ({"prompt": "", "subject": "France", "target_new": "Rome"}, "prompt"),
    ({"prompt": "The capital of {} or {}", "subject": "France", "target_new": "Rome"}, "prompt"),
    ({"prompt": "The capital of France", "subject": "", "target_new": "Rome"}, "subject"),
])
def test_bad_request(model, tokenizer, tmp_path, arch, request_, field):
    hparams = exact_hparams(tmp_path, arch)
    state = create_state(model, tokenizer, hparams)
    original = copy.deepcopy(request_)
    message = refused(model, tokenizer, [FACTS[1], request_], hparams, RequestError, state=state)
    assert f"'{field}'" in message or f"{field} " in message, message
    assert "request 1" in message  # which of the requests is wrong
    assert request_ == original  # the caller's dict is not modified
    assert state.edit_log == [] and all(torch.count_nonzero(c) == 0 for c in state.earlier_keys_kkt_sum.values())


def test_subject_not_in_prompt_names_both(model, tokenizer, tmp_path, arch):
    hparams = exact_hparams(tmp_path, arch)
    message = refused(model, tokenizer, [{"prompt": "The capital of France", "subject": "Germany",
                                          "target_new": "Rome"}], hparams, RequestError)
    assert "Germany" in message and "The capital of France" in message


def test_no_requests(model, tokenizer, tmp_path, arch):
    assert "no requests" in refused(model, tokenizer, [], exact_hparams(tmp_path, arch), RequestError)


def test_braces_in_the_prompt_do_not_move_the_subject_token(tokenizer):
    ids, index = subject_token_index(tokenizer, "The {{capital}} of {}", "France", "subject_last")
    assert tokenizer.convert_ids_to_tokens(ids[index]) == "France"


# ---------------------------------------------------------------------------
# model setup: layers, module templates, architecture
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [[1, 4], [7]])
def test_layer_outside_the_model(model, tokenizer, tmp_path, arch, layers):
    message = refused(model, tokenizer, [FACTS[0]], exact_hparams(tmp_path, arch, layers=layers), ValueError)
    assert "layers" in message and str([l for l in layers if l >= 4]) in message and "0..3" in message


def test_loss_layer_outside_the_model(model, tokenizer, tmp_path, arch):
    message = refused(model, tokenizer, [FACTS[0]], exact_hparams(tmp_path, arch, v_loss_layer=9), ValueError)
    assert "v_loss_layer" in message


def test_module_template_that_matches_nothing(model, tokenizer, tmp_path, arch):
    hparams = exact_hparams(tmp_path, arch, rewrite_module_tmp=WRONG_MODULE[arch])
    message = refused(model, tokenizer, [FACTS[0]], hparams, UnknownArchitectureError)
    assert WRONG_MODULE[arch].format(1) in message and "module_tmp" in message
    assert not (tmp_path / "cache").exists()  # refused before any statistics were computed


def test_module_template_that_matches_nothing_names_the_field(model, tokenizer, tmp_path, arch):
    hparams = exact_hparams(tmp_path, arch, rewrite_module_tmp=WRONG_MODULE[arch])
    assert "rewrite_module_tmp" in refused(model, tokenizer, [FACTS[0]], hparams, UnknownArchitectureError)


def test_module_template_naming_a_module_without_weight(model, tokenizer, tmp_path, arch):
    hparams = exact_hparams(tmp_path, arch, rewrite_module_tmp=NOT_A_LINEAR[arch])
    message = refused(model, tokenizer, [FACTS[0]], hparams, ValueError)
    assert "rewrite_module_tmp" in message and "2-D weight" in message


def test_unknown_architecture_names_the_fields_to_supply(model, tokenizer, tmp_path, arch):
    model.config.model_type = "mystery"
    message = refused(model, tokenizer, [FACTS[0]], exact_hparams(tmp_path, arch), UnknownArchitectureError)
    assert "mystery" in message
    assert all(name in message for name in TEMPLATE_FIELDS)
    # Supplying some fields still names the others ...
    partial = exact_hparams(tmp_path, arch, rewrite_module_tmp=ARCHITECTURES[arch].rewrite_module_tmp)
    message = refused(model, tokenizer, [FACTS[0]], partial, UnknownArchitectureError)
    assert all(name in message for name in TEMPLATE_FIELDS if name != "rewrite_module_tmp")
    # ... and supplying all of them makes the model editable.
    complete = exact_hparams(tmp_path, arch, **{name: getattr(ARCHITECTURES[arch], name) for name in TEMPLATE_FIELDS})
    create_state(model, tokenizer, complete)


# ---------------------------------------------------------------------------
# statistics and null space
# ---------------------------------------------------------------------------

def test_threshold_that_leaves_no_null_space(model, tokenizer, tmp_path, arch):
    hparams = make_hparams(tmp_path, arch, nullspace_threshold=1e-9)  # 40 lines: full-rank statistics
    message = refused(model, tokenizer, [FACTS[0]], hparams, NullSpaceError)
    assert "nullspace_threshold" in message and "no null space" in message and "layer 1" in message
    assert "eigenvalues" in message and ">=" in message


def test_nan_in_cached_statistics(model, tokenizer, tmp_path, arch):
    hparams = exact_hparams(tmp_path, arch)
    create_state(model, tokenizer, hparams)
    root = Path(hparams.stats_dir)
    for path in root.rglob("projectors/*.pt"):
        path.unlink()
    statistics = [p for p in root.rglob("*.pt") if "2.mlp" in p.name]
    assert len(statistics) == 1
    stored = torch.load(statistics[0], weights_only=True)
    stored["moment"][3, 5] = float("nan")  # the key stays valid: only the content is bad
    torch.save(stored, statistics[0])
    message = refused(model, tokenizer, [FACTS[0]], hparams, NullSpaceError)
    assert "layer 2" in message and "NaN" in message


def test_nan_activations_during_the_statistics(model, tokenizer, tmp_path, arch):
    hparams = exact_hparams(tmp_path, arch)
    block = model.get_submodule(ARCHITECTURES[arch].layer_module_tmp.format(0))

    def poison(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden * float("nan")
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(poison)
    try:
        message = refused(model, tokenizer, [FACTS[0]], hparams, FloatingPointError)
    finally:
        handle.remove()
    assert "NaN" in message and "layer 1" in message
    assert not list((tmp_path / "cache").rglob("*.pt"))  # nothing bad was cached


@pytest.mark.parametrize("bad_call", [1, 2])
def test_nan_from_the_solve(model, tokenizer, tmp_path, arch, monkeypatch, bad_call):
    """NaN at the first layer, or at the second after the first layer's update was already added."""
    hparams = exact_hparams(tmp_path, arch)
    state = create_state(model, tokenizer, hparams)
    real, calls = edit_loop.solve_with_terms, []

    def nan_update(*args, **kwargs):
        calls.append(1)
        delta = real(*args, **kwargs)
        return delta * float("nan") if len(calls) == bad_call else delta

    monkeypatch.setattr(edit_loop, "solve_with_terms", nan_update)
    message = refused(model, tokenizer, [FACTS[0]], hparams, EditError, state=state)
    assert "NaN" in message and f"layer {hparams.layers[bad_call - 1]}" in message
    assert state.edit_log == [] and all(torch.count_nonzero(c) == 0 for c in state.earlier_keys_kkt_sum.values())


def test_non_finite_weight_while_writing(model, tokenizer, tmp_path, arch, monkeypatch):
    """The first layer is written, the second would hold inf: both are restored."""
    hparams = exact_hparams(tmp_path, arch)
    state = create_state(model, tokenizer, hparams)
    real, writes = edit_loop.add_to_weight, []

    def overflowing(module, delta):
        real(module, delta)
        writes.append(module)
        # The last layer's second write is the one apply_update makes (the first is compute_update's).
        if writes.count(module) == 2 and len(writes) == 2 * len(hparams.layers):
            with torch.no_grad():
                module.weight.view(-1)[0] = float("inf")

    monkeypatch.setattr(edit_loop, "add_to_weight", overflowing)
    message = refused(model, tokenizer, [FACTS[0]], hparams, EditError, state=state)
    assert "NaN or inf" in message and f"layer {hparams.layers[-1]}" in message
    assert state.edit_log == [] and all(torch.count_nonzero(c) == 0 for c in state.earlier_keys_kkt_sum.values())


def test_state_made_for_other_layers(model, tokenizer, tmp_path, arch):
    state = create_state(model, tokenizer, exact_hparams(tmp_path, arch))
    message = refused(model, tokenizer, [FACTS[0]], exact_hparams(tmp_path, arch, layers=[2, 3]), StateMismatchError,
                      state=state)
    assert "layers" in message and "[1, 2]" in message and "[2, 3]" in message


# ---------------------------------------------------------------------------
# hparams
# ---------------------------------------------------------------------------

GOOD = dict(layers=[1, 2], mom2_dataset="self")


@pytest.mark.parametrize("field, value", [
    ("v_lr", -0.1), ("v_lr", 0), ("v_lr", float("nan")), ("v_lr", "fast"),
    ("fact_token", "middle"), ("alg_name", "MEMIT"), ("layers", []), ("layers", [2, 1]), ("layers", [1, 1]),
    ("layers", [-1]), ("layers", [True]), ("layers", "1,2"), ("nullspace_threshold", 0.0), ("L2", -1.0),
    ("v_num_grad_steps", 0), ("v_num_grad_steps", 2.5), ("mom2_n_samples", 0), ("mom2_dtype", "float16"),
    ("mom2_heldout_fraction", 1.0), ("kl_factor", -0.1), ("clamp_norm_factor", 0), ("v_weight_decay", -1.0),
    ("mom2_dataset", ""), ("rewrite_module_tmp", "transformer.h.mlp.c_proj"), ("layer_selection", "some"),
])
def test_invalid_hparams_name_the_field(field, value):
    with pytest.raises(ValueError) as caught:
        AlphaEditHyperParams(**{**GOOD, field: value})
    assert field in str(caught.value)


def test_missing_layers_in_the_constructor():
    with pytest.raises(TypeError, match="layers"):
        AlphaEditHyperParams(mom2_dataset="self")


def write_yaml(tmp_path, config, name="hp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_from_hparams_reads_the_shipped_file_and_coerces_numbers():
    hparams = AlphaEditHyperParams.from_hparams(REPO / "hparams" / "AlphaEdit" / "smollm2-135m")  # no suffix
    assert hparams.alg_name == "AlphaEdit" and hparams.layers == [4, 5, 6, 7, 8]
    assert hparams.v_lr == 0.5 and isinstance(hparams.v_lr, float)  # yaml reads 5e-1 as a string
    assert hparams.nullspace_threshold == 0.02


@pytest.mark.parametrize("config, words", [
    ({"alg_name": "ROME", "layers": [1]}, ["alg_name", "ROME"]),
    ({"layers": [1]}, ["alg_name"]),
    ({"alg_name": "AlphaEdit", "layers": [1], "mom2_adjustmnet": True, "foo": 1}, ["mom2_adjustmnet", "foo"]),
    ({"alg_name": "AlphaEdit", "v_lr": 0.1}, ["layers"]),
    ({"alg_name": "AlphaEdit", "layers": [1], "v_lr": "-5e-1"}, ["v_lr"]),
])
def test_from_hparams_refuses_bad_files(tmp_path, config, words):
    path = write_yaml(tmp_path, config)
    with pytest.raises(ValueError) as caught:
        AlphaEditHyperParams.from_hparams(path)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_from_hparams_refuses_a_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        AlphaEditHyperParams.from_hparams(path)


def test_from_hparams_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        AlphaEditHyperParams.from_hparams(tmp_path / "nothere")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "hparams" / "AlphaEdit").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_alphaedit_yaml_loads(path):
    hparams = AlphaEditHyperParams.from_hparams(path)
    assert hparams.alg_name == "AlphaEdit" and hparams.layers and hparams.nullspace_threshold > 0


def test_smollm2_gguf_override_must_name_a_file(tmp_path, monkeypatch):
    from alphaedit_plugin import models

    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(models.ModelNotAvailableError, match="ALPHAEDIT_SMOLLM2_GGUF=.*missing.gguf is not a file"):
        models.smollm2_gguf_path()
    present = tmp_path / "model.gguf"
    present.write_bytes(b"GGUF")
    monkeypatch.setenv(models.SMOLLM2_GGUF_ENV, str(present))
    assert models.smollm2_gguf_path() == present
