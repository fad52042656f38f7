"""Architectures as data: where the edited modules live in each model family.

The table is keyed by ``model.config.model_type``, never by substrings of a
model's name. Weight orientation is decided by the module's type: GPT-2's
``Conv1D`` stores its weight as (in, out), ``nn.Linear`` as (out, in).
Everything the editor does is written for the (out, in) orientation and goes
through :func:`weight_as_out_in` / :func:`add_to_weight`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class ModuleTemplates:
    """Module paths of one architecture; ``{}`` stands for the block index."""

    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str


_LLAMA_LIKE = ModuleTemplates(
    rewrite_module_tmp="model.layers.{}.mlp.down_proj",
    layer_module_tmp="model.layers.{}",
    mlp_module_tmp="model.layers.{}.mlp",
    attn_module_tmp="model.layers.{}.self_attn",
    ln_f_module="model.norm",
    lm_head_module="lm_head",
)

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
        lm_head_module="embed_out",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}

TEMPLATE_FIELDS = tuple(f.name for f in dataclasses.fields(ModuleTemplates))


class UnknownArchitectureError(ValueError):
    pass


def templates_for(model: nn.Module, hparams) -> ModuleTemplates:
    """The module templates to use: the hparams' own where given, else the table's.

    Raises :class:`UnknownArchitectureError` when neither supplies all of them.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base: Optional[ModuleTemplates] = ARCHITECTURES.get(model_type)
    values = {}
    missing = []
    for name in TEMPLATE_FIELDS:
        value = getattr(hparams, name, None) or (getattr(base, name) if base else None)
        if value is None:
            missing.append(name)
        values[name] = value
    if missing:
        raise UnknownArchitectureError(
            f"model_type {model_type!r} is not in the architecture table (known: {sorted(ARCHITECTURES)}); "
            f"set these hparams fields to module paths of your model: {', '.join(missing)} "
            f"(for example rewrite_module_tmp: 'model.layers.{{}}.mlp.down_proj')"
        )
    return ModuleTemplates(**values)


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
    config = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise UnknownArchitectureError(f"cannot tell the number of blocks of {type(model).__name__} from its config")


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
