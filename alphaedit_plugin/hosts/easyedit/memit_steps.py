"""The host's own MEMIT steps inside the plugin's edit loop (``memit_steps: easyeditor``).

The MEMIT family (:mod:`alphaedit_plugin.methods.memit`, PRUNE, RECT) takes
its two expensive steps from the plugin by default: the batched target
search and the context-averaged keys. With ``memit_steps: easyeditor`` it
takes them from the installed EasyEdit host instead, unchanged:

- targets: ``easyeditor.models.memit.compute_z.compute_z``, once per request
  (the host's loop), at the last edited layer;
- keys: ``easyeditor.models.memit.compute_ks.compute_ks``;
- the value each layer's residual is measured against:
  ``easyeditor.models.memit.compute_z.get_module_input_output_at_words``
  (``track="out"``) at the last edited layer, on the bare prompts.

Only the solve stays the plugin's, because it is the one line the paper
changes: the host's ``execute_memit`` writes ``R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹``
inline, so it cannot be handed P. Without P the result is therefore the
host's MEMIT itself (``tests/test_host_memit.py`` checks the deltas against
the host's own ``execute_memit`` fed the same statistics and context
prefixes), and with ``projection: true`` it is the host's MEMIT with P in the
solve, the paper's Section 4.5 comparison on one code path.

What the plugin still supplies: the statistics C0 (the host's ``layer_stats``
downloads Wikipedia; ours are the same count-normalised second moment, from a
local corpus and cached with their key), the context prefixes (the host's
``get_context_templates`` samples them into a module global; ours are sampled
once with a seed and kept in the state, in the host's own format), and the
request normalisation (a leading space on the target, ``{}`` for the
subject), which ``execute_memit`` does before it calls these steps. The calls
run inside :func:`alphaedit_plugin.hosts.easyedit.compat.host_step_call`, which
handles the host's hard-coded ``f"cuda:{device}"`` strings, its ``print``
output, its right-padding assumption and its clearing of ``requires_grad``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Dict, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ...architectures import ModuleTemplates, get_module, num_layers
from ...compute_targets import TargetSearchResult
from ...requests import EditRequest
from .compat import host_step_call

logger = logging.getLogger(__name__)


class HostUnavailableError(ImportError):
    """``memit_steps: easyeditor`` was asked for, but the host package cannot be imported."""


def import_host(names: Sequence[str], needed_by: str, remedy: str) -> tuple:
    """The host's objects named ``"module"`` or ``"module:attribute"`` (``easyeditor.models.memit:compute_z``),
    or a :class:`HostUnavailableError` that says what needs them, what the import raised and ``remedy``."""
    found = []
    try:
        for name in names:
            module_name, _, attribute = name.partition(":")
            module = importlib.import_module(module_name)
            found.append(getattr(module, attribute) if attribute else module)
    except Exception as error:  # ImportError, or a host whose import breaks on this transformers
        raise HostUnavailableError(f"{needed_by}; importing it failed with {type(error).__name__}: {error}. "
                                   f"{remedy}") from error
    return tuple(found)


def host_memit_modules():
    """``(compute_z module, compute_ks module, MEMITHyperParams class)`` of the installed host."""
    return import_host(
        ("easyeditor.models.memit.compute_z", "easyeditor.models.memit.compute_ks",
         "easyeditor.models.memit.memit_hparams:MEMITHyperParams"),
        "memit_steps: easyeditor needs the EasyEdit host package (easyeditor) with its MEMIT "
        "(easyeditor.models.memit)",
        "Put the EasyEdit source on sys.path (or install it), or set memit_steps: plugin")


def _parameter_name(model, tensor: torch.Tensor, fallback: str) -> str:
    """The name ``model.named_parameters()`` lists ``tensor`` under.

    The host reads the output embedding with ``get_parameter(model, lm_head_module + ".weight")``,
    which fails for tied embeddings (GPT-2, SmolLM2): ``named_parameters`` lists the shared tensor once,
    under the input embedding's name. The host's own GPT-2 hparams say ``lm_head_module: transformer.wte``
    for this reason; here the name is found by identity.
    """
    for name, parameter in model.named_parameters():
        if parameter is tensor:
            return name[: -len(".weight")] if name.endswith(".weight") else name
    return fallback


def host_fields(model, hparams, templates: ModuleTemplates, alg_name: str) -> Dict[str, Any]:
    """Our settings under the field names of the host's hyperparameter classes (MEMIT's, AlphaEdit's)."""
    loss_layer = hparams.v_loss_layer if hparams.v_loss_layer >= 0 else num_layers(model) + hparams.v_loss_layer
    lm_head = get_module(model, templates.lm_head_module)
    return {
        "layers": list(hparams.layers), "layer_selection": "all", "fact_token": hparams.fact_token,
        "v_num_grad_steps": hparams.v_num_grad_steps, "v_lr": hparams.v_lr, "v_loss_layer": loss_layer,
        "v_weight_decay": hparams.v_weight_decay, "clamp_norm_factor": hparams.clamp_norm_factor,
        "kl_factor": hparams.kl_factor, "mom2_adjustment": True,
        "mom2_update_weight": getattr(hparams, "mom2_update_weight", 0.0),
        "rewrite_module_tmp": templates.rewrite_module_tmp, "layer_module_tmp": templates.layer_module_tmp,
        "mlp_module_tmp": templates.mlp_module_tmp, "attn_module_tmp": templates.attn_module_tmp,
        "ln_f_module": templates.ln_f_module,
        "lm_head_module": _parameter_name(model, lm_head.weight, templates.lm_head_module),
        "mom2_dataset": str(hparams.mom2_dataset), "mom2_n_samples": hparams.mom2_n_samples,
        "mom2_dtype": hparams.mom2_dtype, "alg_name": alg_name, "device": hparams.device,
        "model_name": hparams.model_name if isinstance(hparams.model_name, str) else "model",
        "stats_dir": str(hparams.stats_dir or ""), "batch_size": 1, "max_length": 40, "model_parallel": False,
    }


def fill_host_class(host_class, ours: Dict[str, Any], fallback: str):
    """``host_class(**fields)`` with the fields it has taken from ``ours``; a required field ``ours`` lacks is
    named in the error (``fallback`` says what to do instead)."""
    values, missing = {}, []
    for spec in dataclasses.fields(host_class):
        if spec.name in ours:
            values[spec.name] = ours[spec.name]
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            missing.append(spec.name)
    if missing:
        raise HostUnavailableError(f"the installed easyeditor's {host_class.__name__} needs fields the plugin "
                                   f"cannot fill: {missing}; {fallback}")
    return host_class(**values)


def host_hparams(model, hparams, templates: ModuleTemplates):
    """A real ``easyeditor`` ``MEMITHyperParams`` carrying our settings, for the host's step functions.

    Fields the host class has and we do not know are left at the host's defaults; a required one we cannot
    fill is named in the error.
    """
    _, _, host_class = host_memit_modules()
    return fill_host_class(host_class, host_fields(model, hparams, templates, "MEMIT"), "set memit_steps: plugin")


def host_request(request: EditRequest) -> Dict[str, Any]:
    """A request as the host's steps read it after ``execute_memit``'s normalisation."""
    return {"prompt": request.prompt_template, "subject": request.subject, "target_new": request.target,
            "case_id": request.case_id}


class EasyEditMEMITSteps:
    """The target values and keys of the MEMIT family from the host's ``compute_z`` and ``compute_ks``."""

    label = "easyeditor"

    def __init__(self, hparams):
        host_memit_modules()  # a clear error now if the host is missing, not in the middle of an edit
        self.hparams = hparams

    def _host(self, model, templates: ModuleTemplates):
        cached = getattr(self, "_host_hparams", None)
        if cached is None or cached[0] is not model:
            self._host_hparams = (model, host_hparams(model, self.hparams, templates))
        return self._host_hparams[1]

    def compute_targets(self, model, tok, requests: Sequence[EditRequest], templates, value_layer: int,
                        context_templates) -> TargetSearchResult:
        compute_z_module, _, _ = host_memit_modules()
        host = self._host(model, templates)
        values: List[torch.Tensor] = []
        with host_step_call(model, tok, self.hparams.device, label="easyeditor compute_z"):
            for request in tqdm(requests, desc="easyeditor compute_z", unit="fact", disable=len(requests) < 3,
                                leave=False):
                values.append(compute_z_module.compute_z(model, tok, host_request(request), host, value_layer,
                                                         context_templates).detach())
            initial = self._current_values(model, tok, requests, host, value_layer)
        # The host returns v* only (it prints each step's loss and target probability; logged at DEBUG).
        unknown = [float("nan")] * len(requests)
        return TargetSearchResult(values=torch.stack(values).float(), initial=initial, final_loss=unknown,
                                  target_probability=unknown, steps=host.v_num_grad_steps)

    def compute_keys(self, model, tok, requests: Sequence[EditRequest], templates, layer: int, value_layer: int,
                     context_templates) -> Tuple[torch.Tensor, torch.Tensor]:
        _, compute_ks_module, _ = host_memit_modules()
        host = self._host(model, templates)
        with host_step_call(model, tok, self.hparams.device, label="easyeditor compute_ks"):
            keys = compute_ks_module.compute_ks(model, tok, [host_request(r) for r in requests], host, layer,
                                                context_templates)
            current = self._current_values(model, tok, requests, host, value_layer)
        return keys.detach().float(), current

    @staticmethod
    def _current_values(model, tok, requests: Sequence[EditRequest], host, value_layer: int) -> torch.Tensor:
        """Block ``value_layer``'s output at the subject token of each bare prompt (``execute_memit``'s cur_zs)."""
        compute_z_module, _, _ = host_memit_modules()
        current = compute_z_module.get_module_input_output_at_words(
            model, tok, value_layer, context_templates=[r.prompt_template for r in requests],
            words=[r.subject for r in requests], module_template=host.layer_module_tmp,
            fact_token_strategy=host.fact_token, track="out")
        return current.detach().float()
