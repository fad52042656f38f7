"""Keys K1 of the new facts (MEMIT Eq. 13 inputs; AlphaEdit Sec. 3).

The key of a fact at a layer is the input of that layer's MLP output
projection at the subject's representative token, averaged over the context
prefixes (first within each group of prefixes, then over the groups). In the
same forward pass the block output at the target layer is read, the
"current value" that the residual R = V1 - W K1 is measured against.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .architectures import ModuleTemplates
from .context_templates import flatten
from .requests import EditRequest
from .tracing import capture_inputs, capture_outputs, pad_right, pad_token_id, stop_after, subject_token_index

PROMPTS_PER_FORWARD = 64


@torch.no_grad()
def compute_keys_and_current_values(
    model,
    tok,
    requests: Sequence[EditRequest],
    templates: ModuleTemplates,
    layer: int,
    value_layer: int,
    context_templates: List[List[str]],
    fact_token: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(keys, current_values)``.

    keys: (n_requests, d_in) averaged inputs of ``rewrite_module_tmp.format(layer)``.
    current_values: (n_requests, d_hidden) output of block ``value_layer`` at the
    subject token of the bare prompt (the first context, ``"{}"``).
    """
    contexts = flatten(context_templates)
    if contexts[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    sequences, lookups = [], []
    for request in requests:
        for context in contexts:
            ids, index = subject_token_index(tok, context.format(request.prompt_template), request.subject, fact_token)
            sequences.append(ids)
            lookups.append(index)

    rewrite_name = templates.rewrite_module_tmp.format(layer)
    value_name = templates.layer_module_tmp.format(value_layer)
    stop_name = templates.layer_module_tmp.format(max(layer, value_layer))
    device = next(model.parameters()).device
    pad = pad_token_id(tok)
    key_rows, value_rows = [], []
    with capture_inputs(model, [rewrite_name]) as inputs, capture_outputs(model, [value_name]) as outputs, \
            stop_after(model, stop_name) as run:
        for start in range(0, len(sequences), PROMPTS_PER_FORWARD):
            chunk = sequences[start:start + PROMPTS_PER_FORWARD]
            chunk_lookups = torch.tensor(lookups[start:start + PROMPTS_PER_FORWARD], device=device)
            input_ids, attention_mask = pad_right(chunk, pad, device)
            run(input_ids=input_ids, attention_mask=attention_mask)
            rows = torch.arange(len(chunk), device=device)
            key_rows.append(inputs[rewrite_name][rows, chunk_lookups].float())
            value_rows.append(outputs[value_name][rows, chunk_lookups].float())
    all_keys = torch.cat(key_rows).view(len(requests), len(contexts), -1)
    all_values = torch.cat(value_rows).view(len(requests), len(contexts), -1)

    group_means = []
    offset = 0
    for group in context_templates:
        group_means.append(all_keys[:, offset:offset + len(group)].mean(dim=1))
        offset += len(group)
    keys = torch.stack(group_means, dim=0).mean(dim=0)
    return keys, all_values[:, 0]
