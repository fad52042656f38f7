"""AlphaEdit through the real EasyEdit host (``easyeditor``): registration, BaseEditor.edit/batch_edit,
sequential state across calls, the host's evaluators, bad input. CPU, tiny random models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from conftest import require_host
import torch
import yaml

easyeditor = require_host()

from conftest import VOCAB, build_gpt2, build_llama, make_tokenizer, write_corpus  # noqa: E402
from easyeditor import BaseEditor  # noqa: E402
from easyeditor.util.alg_dict import ALG_DICT  # noqa: E402

import alphaedit_plugin  # noqa: E402
import alphaedit_plugin.hosts.easyedit as ee  # noqa: E402
from alphaedit_plugin import AlphaEditHyperParams, RequestError  # noqa: E402
from alphaedit_plugin.architectures import UnknownArchitectureError  # noqa: E402

HOST = ee.inspect_host()
LEGACY = HOST.restores_only_kept_weights  # PyPI 0.0.1.dev0: edit() keeps edits unless keep_original_weight=True

FACTS = [  # the subject is the last word
    ("The capital of France", "France", "Rome"),
    ("The language of Italy", "Italy", "German"),
    ("The river of Japan", "Japan", "Nile"),
]


def tiny_hparams_dict(tmp_path, **overrides) -> dict:
    config = {
        "alg_name": "AlphaEdit",
        "layers": [1, 2],
        "v_num_grad_steps": 20,
        "v_lr": 0.5,
        "clamp_norm_factor": 10,
        "v_weight_decay": 1e-3,
        "L2": 0.1,
        "nullspace_threshold": 0.5,  # leaves part of the 96/128 key directions as null space here
        "mom2_dataset": write_corpus(tmp_path / "corpus.txt"),
        "mom2_n_samples": 60,
        "stats_dir": str(tmp_path / "stats"),
        "context_template_count": 2,
        "context_template_length": 3,
        "device": "cpu",
        "batch_size": 1,
    }
    config.update(overrides)
    return config


def write_yaml(tmp_path, name="tiny.yaml", **overrides) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_hparams_dict(tmp_path, **overrides)))
    return str(path)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the PyPI host writes logs/run.log into the working directory
    ee.register()


def make_editor(tmp_path, arch="llama", model=None, **overrides):
    hparams = AlphaEditHyperParams.from_hparams(write_yaml(tmp_path, **overrides))
    model = model if model is not None else {"llama": build_llama, "gpt2": build_gpt2}[arch]()
    hparams.model_name = (model, make_tokenizer())
    return BaseEditor.from_hparams(hparams), hparams


def next_word(editor, prompt: str) -> str:
    tok = editor.tok
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        logits = editor.model(input_ids=ids).logits[0, -1]
    return tok.convert_ids_to_tokens(int(logits.argmax()))


def edited_weights(editor, hparams):
    return {l: editor.model.get_submodule(ee.adapter.validate_setup(editor.model, hparams).rewrite_module_tmp.format(l))
            .weight.detach().clone() for l in hparams.layers}


def edit_kwargs(i: int, **extra):
    prompt, subject, target = FACTS[i]
    kwargs = dict(prompts=[prompt], target_new=[target], subject=[subject],
                  rephrase_prompts=[prompt.replace("The", "A", 1)],
                  locality_inputs={"neighborhood": {"prompt": ["The capital of Spain"], "ground_truth": ["Madrid"]}})
    if not LEGACY:
        kwargs["sequential_edit"] = True
    kwargs.update(extra)
    return kwargs


# ---------------------------------------------------------------------------
def test_registered_on_import_and_idempotent():
    first = ee.register()
    second = ee.register()
    assert first == second and first["AlphaEdit"] is ALG_DICT["AlphaEdit"]
    assert set(first) == {entry.name for entry in alphaedit_plugin.registry.registered_methods()}
    assert ee.is_registered()
    init = BaseEditor.__init__
    assert not getattr(init.__wrapped__, "__alphaedit_plugin_patch__", False), "BaseEditor.__init__ wrapped twice"
    from alphaedit_plugin.hosts.easyedit.autoregister import register_if_available
    assert register_if_available() is True
    assert ALG_DICT["AlphaEdit"] is first["AlphaEdit"]


def test_unregister_restores_host_and_register_again():
    entries = dict(ALG_DICT)
    assert ee.unregister() is True
    assert ("AlphaEdit" in ALG_DICT) == HOST.has_own_alphaedit
    assert not getattr(BaseEditor.__init__, "__alphaedit_plugin_patch__", False)
    assert ee.unregister() is False
    ee.register()
    assert set(ALG_DICT) == set(entries)


def test_name_clash_dispatches_by_hparams_type(tmp_path):
    """Where the host has its own AlphaEdit, its hparams still reach it; ours reach the plugin."""
    calls = []

    def host_alphaedit(model, tok, requests, hparams, **kwargs):  # stands in for the host's own editor
        calls.append(hparams)
        return model, {}

    ee.unregister()
    original = ALG_DICT.get("AlphaEdit")
    ALG_DICT["AlphaEdit"] = host_alphaedit
    try:
        dispatcher = ee.register()["AlphaEdit"]
        assert dispatcher.host_apply is host_alphaedit
        assert ee.inspect_host().has_own_alphaedit
        host_hparams = type("HostAlphaEditHyperParams", (), {"alg_name": "AlphaEdit"})()
        dispatcher(None, None, [], host_hparams, copy=False)
        assert calls == [host_hparams]
        ee.unregister()
        assert ALG_DICT["AlphaEdit"] is host_alphaedit
    finally:
        ee.unregister()
        if original is None:
            ALG_DICT.pop("AlphaEdit", None)
        else:
            ALG_DICT["AlphaEdit"] = original
        ee.register()


def test_dispatcher_without_host_alphaedit_rejects_foreign_hparams():
    dispatcher = ALG_DICT["AlphaEdit"]
    if dispatcher.host_apply is not None:
        pytest.skip("this host ships its own AlphaEdit, which takes foreign hparams")
    with pytest.raises(TypeError, match="AlphaEditHyperParams.from_hparams"):
        dispatcher(None, None, [], object())


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_changes_fact_and_host_metrics_report_it(tmp_path, arch):
    editor, hparams = make_editor(tmp_path, arch)
    prompt, _, target = FACTS[0]
    assert next_word(editor, prompt) != target
    metrics, edited_model, _ = editor.edit(**edit_kwargs(0))
    assert edited_model is editor.model
    assert next_word(editor, prompt) == target
    (m,) = metrics
    assert m["post"]["rewrite_acc"] == [1.0]
    assert m["pre"]["rewrite_acc"][0] < 1.0
    assert "rephrase_acc" in m["post"]
    assert "neighborhood_acc" in m["post"]["locality"]  # the host's own locality comparison ran
    assert ee.get_state(editor.model, hparams).edits_applied == 1
    assert not ee.compat.cuda_aliases_active()


def test_portability_evaluated_by_host(tmp_path):
    editor, _ = make_editor(tmp_path)
    kwargs = edit_kwargs(0, portability_inputs={"one_hop": {"prompt": ["The capital of France is in"],
                                                           "ground_truth": ["Italy"]}})
    metrics, _, _ = editor.edit(**kwargs)
    assert "one_hop_acc" in metrics[0]["post"]["portability"]


def test_two_sequential_edit_calls_keep_the_first_fact(tmp_path):
    editor, hparams = make_editor(tmp_path)
    editor.edit(**edit_kwargs(0))
    editor.edit(**edit_kwargs(1))
    assert next_word(editor, FACTS[0][0]) == FACTS[0][2]
    assert next_word(editor, FACTS[1][0]) == FACTS[1][2]
    state = ee.get_state(editor.model, hparams)
    assert state.edits_applied == 2
    assert all(float(cov.abs().sum()) > 0 for cov in state.earlier_keys_kkt_sum.values())


def test_restored_edit_is_taken_out_of_the_state(tmp_path):
    editor, hparams = make_editor(tmp_path)
    editor.edit(**edit_kwargs(0))
    before = edited_weights(editor, hparams)
    cov_before = {l: c.clone() for l, c in ee.get_state(editor.model, hparams).earlier_keys_kkt_sum.items()}
    if LEGACY:
        _, _, weights_copy = editor.edit(**edit_kwargs(1, keep_original_weight=True))
    else:
        _, _, weights_copy = editor.edit(**edit_kwargs(1, sequential_edit=False))
    assert weights_copy, "the host needs the original weights to restore them"
    after = edited_weights(editor, hparams)
    assert all(torch.equal(before[l], after[l]) for l in hparams.layers), "the host restored the weights"
    state = ee.get_state(editor.model, hparams)
    assert state.edits_applied == 1
    for layer, cov in state.earlier_keys_kkt_sum.items():
        assert torch.equal(cov, cov_before[layer])  # undo_last puts back exactly what the first edit left
    assert next_word(editor, FACTS[0][0]) == FACTS[0][2]


def test_reset_state_forgets_earlier_edits(tmp_path):
    editor, hparams = make_editor(tmp_path)
    editor.edit(**edit_kwargs(0))
    assert ee.reset_state(editor) is True
    assert ee.get_state(editor.model, hparams) is None
    editor.edit(**edit_kwargs(1))
    assert ee.get_state(editor.model, hparams).edits_applied == 1


def test_batch_edit(tmp_path):
    editor, hparams = make_editor(tmp_path, batch_size=3)
    prompts, subjects, targets = zip(*FACTS)
    kwargs = dict(prompts=list(prompts), target_new=list(targets), subject=list(subjects))
    if not LEGACY:
        kwargs["sequential_edit"] = True
    metrics, edited_model, _ = editor.batch_edit(**kwargs)
    assert [m["post"]["rewrite_acc"] for m in metrics] == [[1.0]] * 3
    for prompt, _, target in FACTS:
        assert next_word(editor, prompt) == target
    state = ee.get_state(editor.model, hparams)
    assert state.edits_applied == 3 and len(state.edit_log) == 1  # one batch of three


def test_model_given_as_path(tmp_path):
    directory = tmp_path / "tiny-random-model"  # no 'llama'/'gpt' in the name: the hosts' own loaders refuse it
    build_llama().save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    hparams = AlphaEditHyperParams.from_hparams(write_yaml(tmp_path, model_name=str(directory)))
    editor = BaseEditor.from_hparams(hparams)
    assert editor.model_name == str(directory) and hparams.model_name == str(directory)
    metrics, _, _ = editor.edit(**edit_kwargs(0))
    assert metrics[0]["post"]["rewrite_acc"] == [1.0]


def test_other_methods_are_untouched(tmp_path):
    """A host method called with other hparams goes through the host's code only."""
    from easyeditor import ROMEHyperParams  # noqa: F401  (present in both hosts)
    assert not ee.compat.cuda_aliases_active()
    wrapped = BaseEditor.edit
    assert getattr(wrapped, "__alphaedit_plugin_patch__", False)
    assert ee.registration._ours(object()) is False


# ---------------------------------------------------------------------------
def test_bad_alg_name(tmp_path):
    with pytest.raises(ValueError, match="alg_name must be 'AlphaEdit'"):
        AlphaEditHyperParams.from_hparams(write_yaml(tmp_path, alg_name="MEMIT"))


def test_missing_field(tmp_path):
    config = tiny_hparams_dict(tmp_path)
    del config["layers"]
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="missing required field 'layers'"):
        AlphaEditHyperParams.from_hparams(str(tmp_path / "missing.yaml"))


def test_unknown_architecture_fails_before_any_weight_changes(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                     pad_token_id=1, bos_token_id=2, eos_token_id=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnknownArchitectureError, match="model_type 'opt'"):
        make_editor(tmp_path, model=model)  # refused when the editor is built
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field, value", [("target_new", ["Rome", "Paris"]), ("subject", ["France", "Italy"]),
                                          ("rephrase_prompts", [])])
def test_list_lengths_must_match(tmp_path, field, value):
    editor, hparams = make_editor(tmp_path)
    before = edited_weights(editor, hparams)
    kwargs = edit_kwargs(0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"{field} has {len(value)} entries but prompts has 1"):
        editor.edit(**kwargs)
    with pytest.raises(ValueError, match=f"{field} has {len(value)} entries"):
        editor.batch_edit(**{k: v for k, v in kwargs.items() if k not in ("locality_inputs",)})
    after = edited_weights(editor, hparams)
    assert all(torch.equal(before[l], after[l]) for l in hparams.layers)
    assert ee.get_state(editor.model, hparams) is None


def test_locality_length_must_match(tmp_path):
    editor, _ = make_editor(tmp_path)
    kwargs = edit_kwargs(0, locality_inputs={"nb": {"prompt": ["a", "b"], "ground_truth": ["c", "d"]}})
    with pytest.raises(ValueError, match=r"locality_inputs\['nb'\]\['prompt'\] has 2 entries"):
        editor.edit(**kwargs)


def test_layers_outside_the_model_refused_when_the_editor_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"layers \[7\] are outside the model"):
        make_editor(tmp_path, layers=[1, 7])


def test_request_without_subject_is_refused_before_any_weight_changes(tmp_path):
    editor, hparams = make_editor(tmp_path)
    before = edited_weights(editor, hparams)
    kwargs = edit_kwargs(0)
    del kwargs["subject"]
    with pytest.raises(RequestError, match="missing field 'subject'"):
        editor.edit(**kwargs)
    after = edited_weights(editor, hparams)
    assert all(torch.equal(before[l], after[l]) for l in hparams.layers)

# AlphaEdit on the real SmolLM2 through BaseEditor: tests/test_knowedit_host_parity.py (with KnowEdit records and the
# host's evaluators) and notebooks/01_quickstart.ipynb.
