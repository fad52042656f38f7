"""Architectures as data: where the edited modules live in each model family.

The table is keyed by ``model.config.model_type``, never by substrings of a
model's name. Weight orientation is decided by the module's type: GPT-2's
``Conv1D`` stores its weight as (in, out), ``nn.Linear`` as (out, in).
Everything the editor does is written for the (out, in) orientation and goes
through :func:`weight_as_out_in` / :func:`add_to_weight`.

Two of the names are found on the model itself rather than trusted from the
table: the output head (``model.get_output_embeddings()``, mapped back to its
module name; GPT-NeoX calls it ``embed_out``, most others ``lm_head``) and the
final norm (the one norm beside the block list). The table's names are hints
for models where detection finds nothing. See docs/architectures.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

ALTERNATIVE_SEPARATOR = "|"


@dataclass(frozen=True)
class ModuleTemplates:
    """Module paths of one architecture; ``{}`` stands for the block index.

    A template may list alternatives separated by ``|`` (the first that exists in
    a block is used): Qwen3.5 blocks hold either ``self_attn`` or ``linear_attn``.
    """

    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str


def _decoder_rows(decoder: str, attention: str = "self_attn", final_norm: str = "norm") -> ModuleTemplates:
    """The layout of the Llama family: ``<decoder>.layers.{i}`` with ``mlp.down_proj`` and ``<attention>``."""
    return ModuleTemplates(
        rewrite_module_tmp=f"{decoder}.layers.{{}}.mlp.down_proj",
        layer_module_tmp=f"{decoder}.layers.{{}}",
        mlp_module_tmp=f"{decoder}.layers.{{}}.mlp",
        attn_module_tmp=ALTERNATIVE_SEPARATOR.join(f"{decoder}.layers.{{}}.{name}" for name in attention.split("|")),
        ln_f_module=f"{decoder}.{final_norm}",
        lm_head_module="lm_head",
    )


_LLAMA_LIKE = _decoder_rows("model")
# Qwen3.5 mixes gated-delta-net blocks (linear_attn) and softmax-attention blocks (self_attn), as
# config.layer_types says; the MLP (and so the edited down_proj) is the same in both.
_QWEN3_5_TEXT = _decoder_rows("model", attention="self_attn|linear_attn")

ARCHITECTURES: Dict[str, ModuleTemplates] = {
    "gpt2": ModuleTemplates(
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
    ),
    "gptj": ModuleTemplates(
        rewrite_module_tmp="transformer.h.{}.mlp.fc_out",
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
    ),
    "gpt_neox": ModuleTemplates(
        rewrite_module_tmp="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        layer_module_tmp="gpt_neox.layers.{}",
        mlp_module_tmp="gpt_neox.layers.{}.mlp",
        attn_module_tmp="gpt_neox.layers.{}.attention",
        ln_f_module="gpt_neox.final_layer_norm",
        lm_head_module="embed_out",  # a hint: the head is detected (see templates_for)
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    # Gemma 3 with its vision tower (Gemma3ForConditionalGeneration): the text decoder is model.language_model.
    "gemma3": _decoder_rows("model.language_model"),
    # Phi-3 fuses gate and up projections (mlp.gate_up_proj); the edited down_proj is a plain Linear.
    "phi3": _LLAMA_LIKE,
    # OLMo-2 normalises after attention and MLP (no input norm); the block layout is Llama's.
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    # GLM-4 in transformers (the successor of the remote-code ChatGLM): fused gate_up_proj like Phi-3.
    "glm": _LLAMA_LIKE,
    "glm4": _LLAMA_LIKE,
    "qwen3_5_text": _QWEN3_5_TEXT,
    # Command-R: attention and MLP in parallel off one input norm; logits multiplied by config.logit_scale.
    "cohere": _LLAMA_LIKE,
}

TEMPLATE_FIELDS = tuple(f.name for f in dataclasses.fields(ModuleTemplates))


class UnknownArchitectureError(ValueError):
    pass


def text_config(model: nn.Module):
    """The decoder's config (the text config of a multimodal model such as Gemma 3 or Qwen3.5)."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:  # older configs take no argument
            return getter()
    return config


def templates_for(model: nn.Module, hparams) -> ModuleTemplates:
    """The module templates to use: the hparams' own where given, else the table's.

    The output head and the final norm are then checked against the model (see
    :func:`output_head_name` and :func:`final_norm_name`). Raises
    :class:`UnknownArchitectureError` when neither hparams nor table supply all fields.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base: Optional[ModuleTemplates] = ARCHITECTURES.get(model_type)
    values, given, missing = {}, {}, []
    for name in TEMPLATE_FIELDS:
        given[name] = getattr(hparams, name, None)
        value = given[name] or (getattr(base, name) if base else None)
        if value is None:
            missing.append(name)
        values[name] = value
    if missing:
        raise UnknownArchitectureError(
            f"model_type {model_type!r} is not in the architecture table (known: {sorted(ARCHITECTURES)}); "
            f"set these hparams fields to module paths of your model: {', '.join(missing)} "
            f"(for example rewrite_module_tmp: 'model.layers.{{}}.mlp.down_proj'){_suggestions(model, values)}"
        )
    values["lm_head_module"] = output_head_name(model, values["lm_head_module"], explicit=bool(given["lm_head_module"]))
    values["ln_f_module"] = final_norm_name(model, values["ln_f_module"], values["layer_module_tmp"])
    return ModuleTemplates(**values)


# ---------------------------------------------------------------------------
# Detection of the output head and the final norm
# ---------------------------------------------------------------------------
def _find(model: nn.Module, name: Optional[str]) -> Optional[nn.Module]:
    if not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def detected_output_head(model: nn.Module) -> Optional[str]:
    """The module name of ``model.get_output_embeddings()``, or None where the model does not say."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Embedding):
        return None  # an embedding cannot be applied to hidden states
    return next((name for name, module in model.named_modules(remove_duplicate=False) if module is head), None)


def output_head_name(model: nn.Module, hint: Optional[str], explicit: bool = False) -> Optional[str]:
    """The module that maps final hidden states to logits.

    The model's own ``get_output_embeddings()`` decides where it answers; a name the hparams set
    (``explicit``) is kept when it names a module other than an embedding. EasyEdit's yaml files name
    the input embedding for tied models (``transformer.wte``, ``model.embed_tokens``), which cannot be
    applied to hidden states: the detected head, which shares its weight, is used instead.
    """
    detected = detected_output_head(model)
    named = _find(model, hint)
    usable = named is not None and not isinstance(named, nn.Embedding)
    if detected is None or detected == hint:
        return hint
    if explicit and usable:
        logger.debug("lm_head_module %r from the hparams is used; the model's output head is %r", hint, detected)
        return hint
    if named is None:
        reason = "matches no module"
    elif isinstance(named, nn.Embedding):
        tied = _ties(named, _find(model, detected))
        reason = "names the input embedding (tied to the head)" if tied else "names an embedding"
    else:
        reason = "is the table's name"
    log = logger.info if explicit and named is None else logger.debug  # a wrong name in the hparams is news
    log("lm_head_module %r %s; using the model's output head %r", hint, reason, detected)
    return detected


def _ties(a: Optional[nn.Module], b: Optional[nn.Module]) -> bool:
    weight_a, weight_b = getattr(a, "weight", None), getattr(b, "weight", None)
    return weight_a is not None and weight_a is weight_b


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def detected_final_norm(model: nn.Module, layer_module_tmp: Optional[str]) -> Optional[str]:
    """The one norm module beside the block list (``model.norm``, ``transformer.ln_f``, ...), or None."""
    if not layer_module_tmp or "{}" not in layer_module_tmp:
        return None
    blocks = layer_module_tmp.split(ALTERNATIVE_SEPARATOR)[0].split("{}")[0].rstrip(".")  # e.g. "model.layers"
    parent_name = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    parent = _find(model, parent_name) if parent_name else model
    if parent is None:
        return None
    norms = [name for name, child in parent.named_children() if _is_norm(child)]
    if len(norms) != 1:
        return None
    return f"{parent_name}.{norms[0]}" if parent_name else norms[0]


def final_norm_name(model: nn.Module, hint: Optional[str], layer_module_tmp: Optional[str]) -> Optional[str]:
    """The final norm: ``hint`` (the hparams' or the table's) where it exists, else the detected one."""
    if _find(model, hint) is not None:
        return hint
    detected = detected_final_norm(model, layer_module_tmp)
    if detected is not None:
        logger.info("ln_f_module %r matches no module; using the model's final norm %r", hint, detected)
        return detected
    return hint


def _suggestions(model: nn.Module, values: Dict[str, Optional[str]]) -> str:
    """What the model itself suggests for the missing fields, for the error message."""
    found = {}
    blocks = _block_list(model)
    if blocks is not None and not values.get("layer_module_tmp"):
        found["layer_module_tmp"] = f"{blocks}.{{}}"
    head = detected_output_head(model)
    if head is not None and not values.get("lm_head_module"):
        found["lm_head_module"] = head
    norm = detected_final_norm(model, values.get("layer_module_tmp") or found.get("layer_module_tmp"))
    if norm is not None and not values.get("ln_f_module"):
        found["ln_f_module"] = norm
    if not found:
        return ""
    return "; the model suggests " + ", ".join(f"{name}: {value!r}" for name, value in found.items())


def _block_list(model: nn.Module) -> Optional[str]:
    """The name of the ModuleList holding as many modules as the model has blocks."""
    try:
        total = num_layers(model)
    except UnknownArchitectureError:
        return None
    return next((name for name, module in model.named_modules()
                 if isinstance(module, nn.ModuleList) and len(module) == total and name), None)


def module_name(model: nn.Module, template: str, layer: int) -> str:
    """``template`` filled in for block ``layer``; of alternatives (``a|b``) the first that exists."""
    options: List[str] = [option.format(layer) for option in template.split(ALTERNATIVE_SEPARATOR)]
    return next((name for name in options if _find(model, name) is not None), options[0])


def attention_module(model: nn.Module, templates: ModuleTemplates, layer: int) -> nn.Module:
    """The attention (or linear-attention) module of block ``layer``."""
    return get_module(model, module_name(model, templates.attn_module_tmp, layer))


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, with an error that says what exists."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        nearby = sorted(n for n, _ in model.named_modules() if n.startswith(prefix))[:8]
        raise UnknownArchitectureError(
            f"module {name!r} not found in {type(model).__name__}; modules under {prefix!r} include {nearby}. "
            "Check the *_module_tmp fields of the hparams."
        ) from None


def num_layers(model: nn.Module) -> int:
    config = text_config(model)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise UnknownArchitectureError(f"cannot tell the number of blocks of {type(model).__name__} from its config")


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the decoder's, for a multimodal model)."""
    config = text_config(model)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise UnknownArchitectureError(f"cannot tell the hidden size of {type(model).__name__} from its config")


def output_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The head's output as the model's forward returns it: the scalings some families apply after the head.

    Granite divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma 2/3 soft-cap with
    ``final_logit_softcapping``. Read from the fields of the model's own config, as its forward reads them
    (so any family that shares a field is covered); Gemma 3's multimodal class does not soft-cap, and its
    config keeps the field in the text config only.
    """
    config = getattr(model, "config", None)
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap > 0:
        logits = torch.tanh(logits / cap) * cap
    return logits


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D``, whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D"


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight viewed as (out, in), the orientation the math uses."""
    weight = module.weight
    return weight.T if is_transposed(module) else weight


def add_to_weight(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    """Add an (out, in) update to the module's weight, whatever its layout."""
    weight = module.weight
    delta = delta_out_in.T if is_transposed(module) else delta_out_in
    if delta.shape != weight.shape:
        raise ValueError(f"update of shape {tuple(delta.shape)} does not fit weight of shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


def block_output_hidden(output):
    """A transformer block returns a tensor or a tuple starting with one."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_output_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden
