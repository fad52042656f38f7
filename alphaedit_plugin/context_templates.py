"""Context prefixes the keys and target values are averaged over (MEMIT, Sec. 3).

Each edit is learnt in the bare prompt ("{}") and behind a few short texts
the model writes itself, so that the new fact holds in context too. The
prefixes are sampled once, with a fixed seed, and kept in the editing state.
"""

from __future__ import annotations

from typing import List

import torch

from .tracing import encode

START_WORDS = ("The", "Therefore", "Because", "I", "You")


def generate_context_templates(model, tok, count: int, length: int, seed: int) -> List[List[str]]:
    """``[["{}"], [prefix_1 + ". {}", ...]]``: two groups, averaged with equal weight."""
    templates: List[List[str]] = [["{}"]]
    if count == 0:
        return templates
    device = next(model.parameters()).device
    generated: List[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(count):
            start = START_WORDS[i % len(START_WORDS)]
            input_ids = torch.tensor([encode(tok, start)], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=getattr(tok, "pad_token_id", None) or getattr(tok, "eos_token_id", None) or 0,
            )
            text = tok.decode(output[0], skip_special_tokens=True)
            generated.append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() + ". {}")
    templates.append(generated)
    return templates


def flatten(templates: List[List[str]]) -> List[str]:
    return [template for group in templates for template in group]
