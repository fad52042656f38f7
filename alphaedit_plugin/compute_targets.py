"""Target values V1 of the new facts: a short gradient search (MEMIT Eq. 16).

For each fact a vector δ is added to the hidden state at the subject token
at the last edited layer, and optimised so that the model predicts the new
target in every context prefix, while a KL term keeps the model's view of
"{subject} is a" and a decay term keeps δ small. The target value is
v = h + δ.

All facts of a batch are optimised together: their prompts form one padded
batch and each step is one forward and one backward pass. The per-fact
losses are summed, so each δ receives exactly the gradient it would receive
alone (its prompts are independent rows), Adam is element-wise, and facts
that reach the stopping loss are frozen, so the result matches the
one-fact-at-a-time search up to floating-point summation order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .architectures import ModuleTemplates, get_module, num_layers
from .context_templates import flatten
from .requests import EditRequest
from .tracing import capture_outputs, edit_output, encode, pad_right, pad_token_id, stop_after, subject_token_index

logger = logging.getLogger(__name__)

STOP_LOSS = 5e-2
KL_PROMPT = "{} is a"


@dataclass
class TargetSearchResult:
    values: torch.Tensor  # (n, d_hidden) target hidden states v = h + δ
    initial: torch.Tensor  # (n, d_hidden) hidden states h before the search
    final_loss: List[float]
    target_probability: List[float]  # geometric-mean per-token probability of the target at the last step
    steps: int


def _plan_batch(tok, requests: Sequence[EditRequest], contexts: List[str], fact_token: str):
    """Token sequences, subject positions and target positions for all facts."""
    sequences, lookups, owners = [], [], []
    target_positions, target_ids_rows = [], []
    target_lengths = []
    for fact, request in enumerate(requests):
        target_ids = encode(tok, request.target, special_tokens=False)
        if not target_ids:
            raise ValueError(f"request {fact}: target_new {request.target!r} tokenises to nothing")
        target_lengths.append(len(target_ids))
        for context in contexts:
            ids, index = subject_token_index(tok, context.format(request.prompt_template), request.subject, fact_token)
            sequences.append(ids + target_ids[:-1])
            lookups.append(index)
            owners.append(fact)
            target_positions.append([len(ids) - 1 + j for j in range(len(target_ids))])
            target_ids_rows.append(target_ids)
    n_rewrite = len(sequences)
    for fact, request in enumerate(requests):
        ids, index = subject_token_index(tok, KL_PROMPT, request.subject, fact_token)
        sequences.append(ids)
        lookups.append(index)
        owners.append(fact)
    return sequences, lookups, owners, n_rewrite, target_positions, target_ids_rows, target_lengths


def compute_target_values(
    model,
    tok,
    requests: Sequence[EditRequest],
    hparams,
    templates: ModuleTemplates,
    layer: int,
    context_templates: List[List[str]],
) -> TargetSearchResult:
    """Search the target hidden states at block ``layer`` for all ``requests`` at once."""
    contexts = flatten(context_templates)
    n_facts = len(requests)
    sequences, lookups, owners, n_rewrite, target_positions, target_ids_rows, target_lengths = _plan_batch(
        tok, requests, contexts, hparams.fact_token
    )
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_right(sequences, pad_token_id(tok), device)
    rows = torch.arange(len(sequences), device=device)
    lookup_index = torch.tensor(lookups, device=device)
    owner_index = torch.tensor(owners, device=device)

    # Gather indices of target tokens: (row, position, token id) triples.
    gather_rows = torch.tensor([r for r, pos in enumerate(target_positions) for _ in pos], device=device)
    gather_pos = torch.tensor([p for pos in target_positions for p in pos], device=device)
    gather_tok = torch.tensor([t for ids in target_ids_rows for t in ids], device=device)
    # Each rewrite row contributes mean log-prob of its target; each fact averages its rows.
    row_weight = torch.tensor([1.0 / target_lengths[owners[r]] for r in range(n_rewrite)], device=device)
    rows_per_fact = len(contexts)

    loss_layer = hparams.v_loss_layer if hparams.v_loss_layer >= 0 else num_layers(model) + hparams.v_loss_layer
    loss_layer = max(loss_layer, layer)
    edit_name = templates.layer_module_tmp.format(layer)
    readout_name = templates.layer_module_tmp.format(loss_layer)
    final_norm = get_module(model, templates.ln_f_module)
    lm_head = get_module(model, templates.lm_head_module)

    get_module(model, edit_name)  # fails early, naming the module, if the template matches nothing
    delta = torch.zeros((n_facts, model.config.hidden_size), device=device, dtype=torch.float32, requires_grad=True)
    frozen = torch.zeros(n_facts, dtype=torch.bool, device=device)
    frozen_delta = torch.zeros_like(delta)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    initial: torch.Tensor = None  # type: ignore[assignment]

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal initial
        if initial is None:
            first_rows = torch.arange(n_facts, device=device) * rows_per_fact
            initial = hidden[first_rows, lookup_index[first_rows]].detach().float().clone()
        hidden = hidden.clone()
        hidden[rows, lookup_index] = hidden[rows, lookup_index] + delta[owner_index].to(hidden.dtype)
        return hidden

    grad_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    initial_kl = None
    losses = torch.zeros(n_facts)
    step = 0
    try:
        with edit_output(model, edit_name, add_delta), capture_outputs(model, [readout_name]) as outputs, \
                stop_after(model, readout_name) as run:
            for step in range(hparams.v_num_grad_steps):
                optimizer.zero_grad()
                run(input_ids=input_ids, attention_mask=attention_mask)
                readout = outputs[readout_name]
                target_hidden = final_norm(readout[gather_rows, gather_pos])
                target_log_probs = torch.log_softmax(lm_head(target_hidden).float(), dim=-1)
                token_log_probs = target_log_probs.gather(1, gather_tok[:, None]).squeeze(1)
                row_log_prob = torch.zeros(n_rewrite, device=device).index_add(0, gather_rows, token_log_probs)
                nll_per_fact = -(row_log_prob * row_weight).view(n_facts, rows_per_fact).mean(dim=1)

                kl_rows = torch.arange(n_rewrite, len(sequences), device=device)
                kl_hidden = final_norm(readout[kl_rows, lookup_index[kl_rows]])
                kl_log_probs = torch.log_softmax(lm_head(kl_hidden).float(), dim=-1)
                if initial_kl is None:
                    initial_kl = kl_log_probs.detach().clone()
                # KL(current || initial), as MEMIT's kl_div(initial, current, log_target=True).
                kl_per_fact = (kl_log_probs.exp() * (kl_log_probs - initial_kl)).sum(dim=1)

                decay_per_fact = delta.norm(dim=1) / initial.norm(dim=1) ** 2
                loss_per_fact = nll_per_fact + hparams.kl_factor * kl_per_fact + hparams.v_weight_decay * decay_per_fact
                if not torch.isfinite(loss_per_fact).all():
                    raise FloatingPointError(f"target search produced a non-finite loss at step {step}")
                losses = torch.where(frozen.cpu(), losses, loss_per_fact.detach().cpu())
                newly_done = (loss_per_fact.detach() < STOP_LOSS) & ~frozen
                if newly_done.any():
                    frozen_delta[newly_done] = delta.detach()[newly_done]
                    frozen |= newly_done
                logger.debug("target search step %d: losses %s", step, [round(v, 3) for v in losses.tolist()])
                if bool(frozen.all()) or step == hparams.v_num_grad_steps - 1:
                    break
                loss_per_fact[~frozen].sum().backward()
                optimizer.step()
                with torch.no_grad():
                    delta[frozen] = frozen_delta[frozen]
                    max_norm = hparams.clamp_norm_factor * initial.norm(dim=1)
                    norms = delta.norm(dim=1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    delta.mul_(scale[:, None])
            target_probability = torch.exp(
                torch.zeros(n_facts, device=device).index_add(
                    0, owner_index[:n_rewrite], row_log_prob.detach() * row_weight
                ) / rows_per_fact
            )
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)

    with torch.no_grad():
        delta_final = torch.where(frozen[:, None], frozen_delta, delta.detach())
    values = initial + delta_final
    return TargetSearchResult(
        values=values,
        initial=initial,
        final_loss=losses.tolist(),
        target_probability=target_probability.cpu().tolist(),
        steps=step + 1,
    )


def compute_target_values_one_by_one(model, tok, requests, hparams, templates, layer, context_templates) -> TargetSearchResult:
    """The same search run fact by fact (the reference the batched search is measured against)."""
    results = [compute_target_values(model, tok, [request], hparams, templates, layer, context_templates)
               for request in requests]
    return TargetSearchResult(
        values=torch.cat([r.values for r in results]),
        initial=torch.cat([r.initial for r in results]),
        final_loss=[v for r in results for v in r.final_loss],
        target_probability=[v for r in results for v in r.target_probability],
        steps=max(r.steps for r in results),
    )
