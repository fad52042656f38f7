"""Every row of the architecture table on a tiny random model of its type, in float32 and bfloat16.

For each model type: the templates resolve on the model (the output head and the final norm detected), the
target search's readout gives the model's own log-probabilities (soft-capping and logit scaling included),
the target search gives the same result with and without the prefix cache (or says why it runs without),
and a real edit raises the target's probability while changing only the edited layers' weights. Then the
detection itself: GPT-NeoX's head, EasyEdit's tied-embedding head names, unknown model types, and
templates from EasyEdit's remote-code yaml files on model types the table does not know.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from conftest import FACTS, VOCAB, exact_hparams, make_tokenizer, token_id
from alphaedit_plugin import AlphaEditHyperParams, apply_to_model, create_state, normalise_requests, validate_setup
from alphaedit_plugin import architectures
from alphaedit_plugin.architectures import (ARCHITECTURES, TEMPLATE_FIELDS, UnknownArchitectureError, attention_module,
                                            detected_output_head, get_module, hidden_size, module_name, num_layers,
                                            templates_for, weight_as_out_in)
from alphaedit_plugin.compute_targets import _Readout, compute_target_values
from alphaedit_plugin.prefix_cache import split_at, unsupported_reason
from alphaedit_plugin.tracing import capture_outputs

IDS = dict(vocab_size=len(VOCAB), pad_token_id=1, bos_token_id=2, eos_token_id=2)
# Four blocks; a sliding window of 4 tokens is shorter than the prompts, so the windows matter.
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, initializer_range=0.2, **IDS)
ALTERNATING = ["sliding_attention", "full_attention"] * 2


def _gemma3_multimodal():
    extra = 3  # image, begin-of-image and end-of-image tokens after the word vocabulary
    text = dict(DECODER, vocab_size=len(VOCAB) + extra, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                layer_types=ALTERNATING, final_logit_softcapping=5.0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                           image_token_index=len(VOCAB), boi_token_index=len(VOCAB) + 1,
                           eoi_token_index=len(VOCAB) + 2)


CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_positions=64, n_embd=32, n_layer=4, n_head=4, initializer_range=0.2, **IDS),
    "gptj": lambda: tf.GPTJConfig(n_positions=64, n_embd=32, n_layer=4, n_head=4, rotary_dim=4, initializer_range=0.2,
                                  **IDS),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
                                         **IDS),
    "llama": lambda: tf.LlamaConfig(**DECODER),
    "mistral": lambda: tf.MistralConfig(**DECODER, sliding_window=4),
    "qwen2": lambda: tf.Qwen2Config(**DECODER),
    "qwen3": lambda: tf.Qwen3Config(**DECODER, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(**DECODER, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**DECODER, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                      final_logit_softcapping=5.0),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**DECODER, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                               layer_types=ALTERNATING, final_logit_softcapping=5.0),
    "gemma3": _gemma3_multimodal,
    "phi3": lambda: tf.Phi3Config(**DECODER),
    "olmo2": lambda: tf.Olmo2Config(**DECODER),
    "granite": lambda: tf.GraniteConfig(**DECODER, logits_scaling=2.0, embedding_multiplier=2.0,
                                        residual_multiplier=0.5, attention_multiplier=0.125),
    "smollm3": lambda: tf.SmolLM3Config(**DECODER),
    "cohere": lambda: tf.CohereConfig(**DECODER, logit_scale=0.5),
    "glm": lambda: tf.GlmConfig(**DECODER, head_dim=8),
    "glm4": lambda: tf.Glm4Config(**DECODER, head_dim=8),
    "qwen3_5_text": lambda: tf.Qwen3_5TextConfig(**DECODER, head_dim=8, linear_num_key_heads=2,
                                                 linear_num_value_heads=4, linear_key_head_dim=8,
                                                 linear_value_head_dim=8, linear_conv_kernel_dim=3,
                                                 layer_types=["linear_attention", "full_attention"] * 2),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(model_type: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    assert config.model_type == model_type
    return tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_every_table_row_has_a_tiny_model():
    assert sorted(CONFIGS) == sorted(ARCHITECTURES)


# ---------------------------------------------------------------------------
# Per row: templates, readout, prefix cache, a real edit
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_templates_resolve_on_the_model(model_type):
    model = build(model_type)
    templates = templates_for(model, None)
    assert get_module(model, templates.lm_head_module) is model.get_output_embeddings()
    assert "norm" in type(get_module(model, templates.ln_f_module)).__name__.lower()
    for layer in range(num_layers(model)):
        rewrite = get_module(model, templates.rewrite_module_tmp.format(layer))
        assert weight_as_out_in(rewrite).shape[0] == hidden_size(model)  # it writes the residual stream
        assert get_module(model, templates.rewrite_module_tmp.format(layer)) in \
            get_module(model, templates.mlp_module_tmp.format(layer)).modules()
        block = get_module(model, templates.layer_module_tmp.format(layer))
        assert attention_module(model, templates, layer) in block.modules()


def test_qwen3_5_attention_is_resolved_per_block():
    model = build("qwen3_5_text")
    templates = templates_for(model, None)
    names = [module_name(model, templates.attn_module_tmp, layer) for layer in range(4)]
    assert names == ["model.layers.0.linear_attn", "model.layers.1.self_attn",
                     "model.layers.2.linear_attn", "model.layers.3.self_attn"]  # as config.layer_types says


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_readout_gives_the_models_own_log_probabilities(model_type, tok):
    """Final norm, head and the family's logit scaling/soft-capping, applied to the last block's output."""
    model = build(model_type)
    hparams = AlphaEditHyperParams(layers=[1])
    templates = templates_for(model, hparams)
    readout = _Readout.of(model, hparams, templates, 1)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad(), capture_outputs(model, [readout.readout_name]) as outputs:
        logits = model(input_ids=ids).logits
        ours = readout.log_probs(outputs[readout.readout_name])
    assert torch.allclose(ours, logits.float().log_softmax(-1), atol=1e-4)


REQUESTS = [
    {"prompt": "The capital of France", "subject": "France", "target_new": "Rome"},
    {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy"},  # subject at position 0
    {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Berlin Madrid"},
]
# Context prefixes longer than the sliding window (4), so the windows cut into the prefixes.
CONTEXTS = [["{}"], ["The city of the capital of Italy. {}", "Because I. {}"]]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_prefix_cache_gives_the_full_pass_result_or_is_refused(model_type, tok, caplog):
    model = build(model_type)
    hparams = AlphaEditHyperParams(layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, clamp_norm_factor=10,
                                   v_weight_decay=1e-3)
    templates = templates_for(model, hparams)
    requests = normalise_requests(REQUESTS)
    full = compute_target_values(model, tok, requests, hparams, templates, 2, CONTEXTS, use_prefix_cache=False)
    with caplog.at_level(logging.DEBUG, logger="alphaedit_plugin.compute_targets"):
        cached = compute_target_values(model, tok, requests, hparams, templates, 2, CONTEXTS, use_prefix_cache=True)
    fell_back = [r.getMessage() for r in caplog.records if "no prefix cache" in r.getMessage()]
    reason = unsupported_reason(model)
    if model_type == "qwen3_5_text":  # gated-delta-net blocks: their state is not continued from a cache
        assert reason is not None and "linear_attention" in reason
    if reason is not None:
        assert fell_back and reason in fell_back[0]
        with pytest.raises(ValueError, match="linear_attention|chunked"):
            split_at(model, [[5, 6, 7]], [1], pad=1, device="cpu")
    else:
        assert not fell_back, fell_back
    assert torch.allclose(cached.initial, full.initial, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cached.values, full.values, rtol=1e-4, atol=1e-4)
    assert cached.final_loss == pytest.approx(full.final_loss, rel=1e-4, abs=1e-5)
    assert not torch.allclose(full.values, full.initial)  # the search moved: the comparison means something


def test_a_sliding_window_cache_that_drops_prefix_keys_is_refused(monkeypatch):
    """The prefix pass gets a cache without windows; were it the model's own, the window would drop keys."""
    import alphaedit_plugin.prefix_cache as prefix_cache

    model = build("mistral")  # every layer slides over 4 tokens
    monkeypatch.setattr(prefix_cache, "_has_sliding_window", lambda _model: False)
    with pytest.raises(ValueError, match="instead of all 6 prefix columns"):
        split_at(model, [[5, 6, 7, 8, 9, 10, 11, 12], [9, 10]], [6, 1], pad=1, device="cpu")


def _edited_weight_names(model, hparams):
    templates = templates_for(model, hparams)
    return {templates.rewrite_module_tmp.format(layer) + ".weight" for layer in hparams.layers}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_edit_takes_and_touches_only_the_edited_layers(model_type, dtype, tok, tmp_path):
    model = build(model_type, DTYPES[dtype])
    hparams = exact_hparams(tmp_path, model_type)  # layers 1 and 2 of 4, an exact null space
    prompt, target = FACTS[0]["prompt"], token_id(tok, FACTS[0]["target_new"])
    ids = torch.tensor([tok(prompt)["input_ids"]])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        p_before = model(input_ids=ids).logits[0, -1].float().softmax(-1)[target].item()

    state = create_state(model, tok, hparams)
    apply_to_model(model, tok, [FACTS[0]], hparams, state=state)

    after = model.state_dict()
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    assert changed == _edited_weight_names(model, hparams)
    assert all(after[name].dtype == DTYPES[dtype] and torch.isfinite(after[name]).all() for name in changed)
    assert all(p.dtype == DTYPES[dtype] for p in model.parameters())
    with torch.no_grad():
        p_after = model(input_ids=ids).logits[0, -1].float().softmax(-1)[target].item()
    assert p_after > 2 * p_before and p_after > p_before + 0.02, f"P(target) {p_before:.4f} -> {p_after:.4f}"


# ---------------------------------------------------------------------------
# Detection of the head and the final norm
# ---------------------------------------------------------------------------
def test_gpt_neox_head_is_detected_on_this_transformers(monkeypatch):
    model = build("gpt_neox")
    head = model.get_output_embeddings()
    expected = next(name for name, module in model.named_modules() if module is head)
    assert detected_output_head(model) == expected
    assert templates_for(model, None).lm_head_module == expected
    # The table's name is only a hint: a stale one (as if transformers renamed the head) is corrected.
    stale = ARCHITECTURES["gpt_neox"].__class__(**{**vars(ARCHITECTURES["gpt_neox"]), "lm_head_module": "lm_head"})
    monkeypatch.setitem(ARCHITECTURES, "gpt_neox", stale)
    assert templates_for(model, None).lm_head_module == expected


def test_a_wrong_or_missing_final_norm_name_is_detected(monkeypatch):
    model = build("gpt_neox")
    row = ARCHITECTURES["gpt_neox"]
    monkeypatch.setitem(ARCHITECTURES, "gpt_neox", row.__class__(**{**vars(row), "ln_f_module": "gpt_neox.norm"}))
    assert templates_for(model, None).ln_f_module == "gpt_neox.final_layer_norm"


@pytest.mark.parametrize("model_type, embedding", [("gpt2", "transformer.wte"), ("llama", "model.embed_tokens")])
def test_easyedit_tied_embedding_head_names_map_to_the_head(model_type, embedding):
    """EasyEdit's gpt2-xl.yaml and llama3.2-3b.yaml name the input embedding as lm_head_module (tied models)."""
    model = build(model_type)
    hparams = AlphaEditHyperParams(layers=[1], lm_head_module=embedding)
    assert templates_for(model, hparams).lm_head_module == "lm_head"


def test_hparams_head_name_that_exists_is_kept():
    model = build("llama")
    hparams = AlphaEditHyperParams(layers=[1], lm_head_module="model.norm")  # odd, but the user's choice
    assert templates_for(model, hparams).lm_head_module == "model.norm"


def test_unknown_model_type_names_the_missing_fields_and_suggests_names():
    model = build("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnknownArchitectureError) as raised:
        templates_for(model, AlphaEditHyperParams(layers=[1]))
    message = str(raised.value)
    assert "'mystery'" in message and all(name in message for name in TEMPLATE_FIELDS)
    assert "'model.layers.{}'" in message and "'lm_head'" in message and "'model.norm'" in message
    partial = AlphaEditHyperParams(layers=[1], rewrite_module_tmp="model.layers.{}.mlp.down_proj")
    with pytest.raises(UnknownArchitectureError) as raised:
        templates_for(model, partial)
    assert "set these hparams fields to module paths of your model: layer_module_tmp" in str(raised.value)


# ---------------------------------------------------------------------------
# Remote-code families: templates from EasyEdit's yaml files on model types the table does not know
# ---------------------------------------------------------------------------
EASYEDIT_MEMIT = Path(__file__).resolve().parents[2] / "shared" / "hosts" / "EasyEdit" / "hparams" / "MEMIT"
# The templates of EasyEdit's yaml files for remote-code models, with a stand-in of the same layout here.
REMOTE = {
    "baichuan": ("baichuan-7b.yaml", "llama"),
    "internlm": ("internlm-7b.yaml", "llama"),
    "qwen": ("qwen-7b.yaml", "gpt2"),
}
REMOTE_TEMPLATES = {
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                  ln_f_module="model.norm", lm_head_module="lm_head"),
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                 mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                 ln_f_module="transformer.ln_f", lm_head_module="lm_head"),
}


def _remote_templates(family: str) -> dict:
    filename, stand_in = REMOTE[family]
    path = EASYEDIT_MEMIT / filename
    if not path.is_file():
        return REMOTE_TEMPLATES[stand_in]
    config = yaml.safe_load(path.read_text())
    templates = {name: config[name] for name in TEMPLATE_FIELDS}
    assert templates == REMOTE_TEMPLATES[stand_in]  # the stand-in has the layout the yaml file names
    return templates


@pytest.mark.parametrize("family", sorted(REMOTE))
def test_remote_code_templates_from_hparams_work(family, tok, tmp_path):
    stand_in = REMOTE[family][1]
    model = build(stand_in)
    model.config.model_type = family
    assert family not in ARCHITECTURES
    hparams = exact_hparams(tmp_path, family, **_remote_templates(family))
    validate_setup(model, hparams)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    apply_to_model(model, tok, [FACTS[0]], hparams, state=create_state(model, tok, hparams))
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == _edited_weight_names(model, hparams)


def test_alternative_templates_from_hparams_pass_validation():
    hparams = AlphaEditHyperParams(layers=[1], attn_module_tmp="model.layers.{}.self_attn|model.layers.{}.linear_attn")
    assert architectures.ALTERNATIVE_SEPARATOR in hparams.attn_module_tmp
