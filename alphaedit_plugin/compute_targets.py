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

The same independence lets a large batch be searched in chunks: the padded
tokens of one pass are kept under ``TOKENS_PER_PASS``, which bounds the
activation memory of the backward pass (long prompts and targets, such as
KnowEdit's WikiBio passages, otherwise need tens of GB for a batch of 20).
Facts are grouped by the length of their rows, so that few pad a chunk to a
long one's width; on the CPU, where a pass costs in proportion to its padded
tokens, a chunk that already holds ``CPU_MIN_CHUNK_TOKENS`` is also closed
where padding would grow it past ``CPU_PADDING_TOLERANCE`` over its rows' own
tokens (a fifth to a third fewer tokens per step on KnowEdit WikiBio and
CounterFact; benchmarks/search_chunking.py). Smaller batches stay one pass.
On a GPU one wide pass costs about what a narrow one does, and chunks are
only cut at the budget.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch

from .architectures import (ModuleTemplates, block_output_hidden, get_module, hidden_size, num_layers,
                            output_logits)
from .context_templates import flatten
from .prefix_cache import PrefixSplit, split_at
from .requests import EditRequest
from .tracing import (capture_outputs, edit_output, encode, pad_right, pad_token_id, record_outputs, replay_blocks,
                      stop_after, subject_token_index)

logger = logging.getLogger(__name__)

STOP_LOSS = 5e-2
KL_PROMPT = "{} is a"
# Padded tokens (rows x longest row) per forward/backward pass of the search. On SmolLM2-135M in fp32 one
# token costs about 1.2 MB of activations, so a pass stays near 10 GB; batches over it are searched in chunks.
TOKENS_PER_PASS = 8192
CPU_PADDING_TOLERANCE = 0.25
CPU_MIN_CHUNK_TOKENS = 200  # below it a pass's fixed cost is a noticeable share of its time


@dataclass
class TargetSearchResult:
    values: torch.Tensor  # (n, d_hidden) target hidden states v = h + δ
    initial: torch.Tensor  # (n, d_hidden) hidden states h before the search
    final_loss: List[float]
    target_probability: List[float]  # geometric-mean per-token probability of the target at the last step
    steps: int


# ---------------------------------------------------------------------------
# The prompt layout: the token rows of each fact
# ---------------------------------------------------------------------------
@dataclass
class _FactPrompts:
    """The token sequences of one fact: one per context prefix, then its KL prompt."""

    rewrite: List[List[int]]
    rewrite_lookups: List[int]
    target_ids: List[int]
    kl: List[int]
    kl_lookup: int


def _fact_prompts(tok, request: EditRequest, index: int, contexts: List[str], fact_token: str) -> _FactPrompts:
    target_ids = encode(tok, request.target, special_tokens=False)
    if not target_ids:
        raise ValueError(f"request {index}: target_new {request.target!r} tokenises to nothing")
    rewrite, lookups = [], []
    for context in contexts:
        ids, position = subject_token_index(tok, context.format(request.prompt_template), request.subject, fact_token)
        rewrite.append(ids + target_ids[:-1])  # the model reads the target up to its last token
        lookups.append(position)
    kl_ids, kl_lookup = subject_token_index(tok, KL_PROMPT, request.subject, fact_token)
    return _FactPrompts(rewrite, lookups, target_ids, kl_ids, kl_lookup)


def _row_lengths(fact: _FactPrompts, from_subject: bool) -> List[int]:
    """The lengths of a fact's rows (rewrite and KL): whole, or from the subject token on (as a pass with the
    prefix cache runs them)."""
    rows = fact.rewrite + [fact.kl]
    if not from_subject:
        return [len(row) for row in rows]
    return [len(row) - lookup for row, lookup in zip(rows, fact.rewrite_lookups + [fact.kl_lookup])]


def chunk_by_tokens(prompts: Sequence[_FactPrompts], budget: int, padding_tolerance: float = math.inf,
                    by_width: bool = False, min_tokens: int = 0, from_subject: bool = False) -> List[List[int]]:
    """Groups of fact indices whose padded whole rows (rewrite and KL) fit ``budget`` tokens each; a fact over
    the budget on its own gets a group to itself. Facts are taken in their order, or with ``by_width`` from the
    narrowest to the widest; a group of at least ``min_tokens`` padded tokens is also closed where its padded
    tokens would exceed ``1 + padding_tolerance`` times its rows' own. The order and the padding count the rows
    as a pass runs them: from the subject token on with ``from_subject`` (the prefix cache), whole otherwise."""
    whole = [_row_lengths(fact, False) for fact in prompts]
    run = [_row_lengths(fact, from_subject) for fact in prompts]
    order = range(len(prompts))
    if by_width:
        order = sorted(order, key=lambda i: max(run[i]))
    groups: List[List[int]] = []
    current: List[int] = []
    group = _Extent(0, 0, 0, 0)
    for index in order:
        fact = _Extent(len(whole[index]), max(whole[index]), max(run[index]), sum(run[index]))
        grown = group.plus(fact)
        too_padded = group.padded_run >= min_tokens and grown.padded_run > (1 + padding_tolerance) * grown.own
        if current and (grown.padded_whole > budget or too_padded):
            groups.append(current)
            current, grown = [], fact
        current.append(index)
        group = grown
    groups.append(current)
    return groups


class _Extent(NamedTuple):
    """The rows of a fact or a group of facts: how many, the widest whole, the widest as a pass runs them, and
    the tokens of those rows as run."""

    rows: int
    width: int
    run_width: int
    own: int

    def plus(self, other: "_Extent") -> "_Extent":
        return _Extent(self.rows + other.rows, max(self.width, other.width), max(self.run_width, other.run_width),
                       self.own + other.own)

    @property
    def padded_whole(self) -> int:
        return self.rows * self.width

    @property
    def padded_run(self) -> int:
        return self.rows * self.run_width


# ---------------------------------------------------------------------------
# The batch layout: the rows of the facts still searched, padded, with the indices the loss needs
# ---------------------------------------------------------------------------
@dataclass
class _Batch:
    """Padded inputs for a subset of facts, with the indices the loss needs."""

    facts: torch.Tensor  # (k,) indices of the facts in this batch
    inputs: Dict[str, torch.Tensor]  # the full rows, right-padded (used when there is no prefix split)
    split: Optional[PrefixSplit]  # the rows from the subject token on, prefixes computed once
    edit_rows: torch.Tensor  # every row gets its fact's delta at its subject token
    edit_positions: torch.Tensor
    edit_owner: torch.Tensor  # the fact (row of delta) each edited row belongs to
    first_rows: torch.Tensor  # (k,) the bare-prompt row of each fact
    gather_rows: torch.Tensor  # one entry per target token of every rewrite row
    gather_positions: torch.Tensor
    gather_tokens: torch.Tensor
    row_weight: torch.Tensor  # 1 / target length, per rewrite row
    n_rewrite: int
    kl_rows: torch.Tensor
    kl_positions: torch.Tensor
    # The edited block's output before δ, per row, from the batch's first pass: nothing below δ changes, so
    # later passes replay it instead of running the blocks below (None until the first pass).
    below: Optional[torch.Tensor] = None

    def forward_inputs(self) -> Dict[str, Any]:
        return self.split.forward_inputs() if self.split is not None else self.inputs


def _rows_in(previous: _Batch, prompts: List[_FactPrompts], facts: List[int]) -> List[int]:
    """The rows of ``previous`` that belong to ``facts``, in the order ``_build_batch`` lays them out:
    every fact's rewrite rows, then one KL row per fact."""
    first_row, kl_row = {}, {}
    row = 0
    old_facts = previous.facts.tolist()
    for index, fact in enumerate(old_facts):
        first_row[fact] = row
        row += len(prompts[fact].rewrite)
        kl_row[fact] = previous.n_rewrite + index
    rewrite = [first_row[f] + j for f in facts for j in range(len(prompts[f].rewrite))]
    return rewrite + [kl_row[f] for f in facts]


_FALLBACKS_REPORTED = set()  # (model class, reason) pairs already logged at INFO


def _log_fallback(model, error: Exception) -> None:
    """Say once per model class and reason (at INFO, then at DEBUG) why the prefix is not cached."""
    key = (type(model).__name__, str(error))
    log = logger.debug if key in _FALLBACKS_REPORTED else logger.info
    _FALLBACKS_REPORTED.add(key)
    log("target search runs every prompt in full (no prefix cache): %s", error)


def _build_batch(model, prompts: List[_FactPrompts], facts: List[int], pad: int, device,
                 use_prefix_cache: bool, previous: Optional[_Batch] = None) -> _Batch:
    """Rows of the given facts; positions are in the coordinates of the rows the model will see.

    With ``previous`` (a batch holding every fact in ``facts``) its prefix split is reused for the
    remaining rows instead of running the prefixes again.
    """
    sequences, lookups, owners = [], [], []
    gather_rows, gather_positions, gather_tokens, row_weight, first_rows = [], [], [], [], []
    for fact in facts:
        first_rows.append(len(sequences))
        for ids, position in zip(prompts[fact].rewrite, prompts[fact].rewrite_lookups):
            row = len(sequences)
            target = prompts[fact].target_ids
            start = len(ids) - len(target)  # position that predicts the first target token
            gather_rows += [row] * len(target)
            gather_positions += list(range(start, start + len(target)))
            gather_tokens += target
            row_weight.append(1.0 / len(target))
            sequences.append(ids)
            lookups.append(position)
            owners.append(fact)
    n_rewrite = len(sequences)
    for fact in facts:
        sequences.append(prompts[fact].kl)
        lookups.append(prompts[fact].kl_lookup)
        owners.append(fact)
    split = None
    kept_rows = _rows_in(previous, prompts, facts) if previous is not None else None
    if previous is not None and previous.split is not None:
        split = previous.split.select(kept_rows)
    elif use_prefix_cache:
        try:
            split = split_at(model, sequences, lookups, pad, device)
        except (ValueError, TypeError) as error:
            _log_fallback(model, error)
    if split is not None:  # every row now starts at its subject token
        gather_positions = [p - lookups[r] for r, p in zip(gather_rows, gather_positions)]
        lookups = [0] * len(lookups)
        inputs = {}
    else:
        input_ids, attention_mask = pad_right(sequences, pad, device)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}

    def tensor(values):
        return torch.tensor(values, device=device)

    below = None
    if previous is not None and previous.below is not None:  # causal: a row's states do not depend on the width
        width = split.suffix_ids.shape[1] if split is not None else inputs["input_ids"].shape[1]
        below = previous.below[torch.as_tensor(kept_rows, device=previous.below.device), :width]
    return _Batch(
        facts=tensor(facts), inputs=inputs, split=split,
        edit_rows=torch.arange(len(sequences), device=device), edit_positions=tensor(lookups), edit_owner=tensor(owners),
        first_rows=tensor(first_rows), gather_rows=tensor(gather_rows), gather_positions=tensor(gather_positions),
        gather_tokens=tensor(gather_tokens), row_weight=torch.tensor(row_weight, device=device),
        n_rewrite=n_rewrite, kl_rows=torch.arange(n_rewrite, len(sequences), device=device),
        kl_positions=tensor(lookups[n_rewrite:]), below=below,
    )


def compute_target_values(
    model,
    tok,
    requests: Sequence[EditRequest],
    hparams,
    templates: ModuleTemplates,
    layer: int,
    context_templates: List[List[str]],
    use_prefix_cache: bool = True,
    tokens_per_pass: Optional[int] = None,
    replay_lower_blocks: bool = True,
    padding_tolerance: Optional[float] = None,
    group_by_width: bool = True,
) -> TargetSearchResult:
    """Search the target hidden states at block ``layer`` for all ``requests`` at once.

    Facts whose loss falls below the stopping value are frozen and leave the
    batch, so later steps only pay for the facts still being optimised. With
    ``use_prefix_cache`` the tokens before each subject are run once per
    batch (see prefix_cache.py); the result is the same up to float rounding.
    Batches over ``tokens_per_pass`` padded tokens (default ``TOKENS_PER_PASS``)
    are searched chunk by chunk, with the same result up to float rounding;
    ``padding_tolerance`` (default ``CPU_PADDING_TOLERANCE`` on the CPU, none
    elsewhere; ``math.inf`` for none) also closes a chunk of at least
    ``CPU_MIN_CHUNK_TOKENS`` that padding would grow by more than that share.
    ``group_by_width=False`` chunks the facts in their order (as versions
    before 2026-12-02 did).
    With ``replay_lower_blocks`` the blocks up to ``layer``, which δ does not
    reach, run in a batch's first pass only; later passes replay their output.
    """
    contexts = flatten(context_templates)
    prompts = [_fact_prompts(tok, r, i, contexts, hparams.fact_token) for i, r in enumerate(requests)]
    budget = TOKENS_PER_PASS if tokens_per_pass is None else tokens_per_pass
    if padding_tolerance is None:
        on_cpu = next(model.parameters()).device.type == "cpu"
        padding_tolerance = CPU_PADDING_TOLERANCE if on_cpu else math.inf
    groups = chunk_by_tokens(prompts, budget, padding_tolerance, by_width=group_by_width,
                             min_tokens=CPU_MIN_CHUNK_TOKENS, from_subject=use_prefix_cache)
    options = dict(rows_per_fact=len(contexts), use_prefix_cache=use_prefix_cache,
                   replay_lower_blocks=replay_lower_blocks)
    if len(groups) == 1:
        return _search(model, tok, prompts, hparams, templates, layer, **options)
    logger.info("target search: %d facts in %d chunks of at most %d padded tokens", len(prompts), len(groups), budget)
    results = [_search(model, tok, [prompts[i] for i in group], hparams, templates, layer, **options)
               for group in groups]
    return _in_fact_order(results, groups)


def _in_fact_order(results: Sequence[TargetSearchResult], groups: Sequence[Sequence[int]]) -> TargetSearchResult:
    """One result from the chunks' results, its rows in the facts' order (the chunks hold facts in any order)."""
    facts = [i for group in groups for i in group]
    where = torch.argsort(torch.tensor(facts))  # where = position in the concatenation of fact 0, 1, ...
    final_loss = [v for r in results for v in r.final_loss]
    probability = [v for r in results for v in r.target_probability]
    values, initial = torch.cat([r.values for r in results]), torch.cat([r.initial for r in results])
    return TargetSearchResult(
        values=values[where.to(values.device)], initial=initial[where.to(initial.device)],
        final_loss=[final_loss[i] for i in where.tolist()],
        target_probability=[probability[i] for i in where.tolist()],
        steps=max(r.steps for r in results),
    )


# ---------------------------------------------------------------------------
# The optimisation loop
# ---------------------------------------------------------------------------
@dataclass
class _Readout:
    """Where δ goes in and where the loss is read: block ``layer``'s output, then block ``loss_layer``'s
    output through the final norm and the head."""

    edit_name: str
    readout_name: str
    final_norm: torch.nn.Module
    lm_head: torch.nn.Module
    model: torch.nn.Module  # whose config says how the head's output is scaled (see output_logits)

    @classmethod
    def of(cls, model, hparams, templates: ModuleTemplates, layer: int) -> "_Readout":
        loss_layer = hparams.v_loss_layer if hparams.v_loss_layer >= 0 else num_layers(model) + hparams.v_loss_layer
        loss_layer = max(loss_layer, layer)
        edit_name = templates.layer_module_tmp.format(layer)
        get_module(model, edit_name)  # fails early, naming the module, if the template matches nothing
        return cls(edit_name=edit_name, readout_name=templates.layer_module_tmp.format(loss_layer),
                   final_norm=get_module(model, templates.ln_f_module),
                   lm_head=get_module(model, templates.lm_head_module), model=model)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities as the model's own forward gives them (soft-capping and logit scaling included)."""
        return torch.log_softmax(output_logits(self.model, self.lm_head(self.final_norm(hidden))).float(), dim=-1)


class _DeltaSearch:
    """The δ of every fact of one search, its Adam optimiser and what the search has learnt so far."""

    def __init__(self, n_facts: int, hidden_size: int, device, hparams):
        self.hparams = hparams
        self.delta = torch.zeros((n_facts, hidden_size), device=device, dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.delta], lr=hparams.v_lr)
        self.frozen = torch.zeros(n_facts, dtype=torch.bool, device=device)
        self.frozen_delta = torch.zeros_like(self.delta)
        self.initial = torch.zeros((n_facts, hidden_size), device=device)  # h at the subject token, before δ
        self.initial_kl: Optional[torch.Tensor] = None  # (n_facts, vocab) log-probabilities, from the first step
        self.losses = torch.zeros(n_facts)
        self.probabilities = torch.zeros(n_facts)

    def add_delta(self, batch: _Batch, record_initial: bool, hidden: torch.Tensor) -> torch.Tensor:
        """The edited layer's output with each row's fact's δ added at its subject token."""
        if record_initial:
            self.initial[batch.facts] = hidden[batch.first_rows, batch.edit_positions[batch.first_rows]].detach().float()
        hidden = hidden.clone()
        rows, positions = batch.edit_rows, batch.edit_positions
        hidden[rows, positions] = hidden[rows, positions] + self.delta[batch.edit_owner].to(hidden.dtype)
        return hidden

    def loss(self, batch: _Batch, readout: torch.Tensor, heads: _Readout, rows_per_fact: int) -> torch.Tensor:
        """Per active fact: −mean log P(target) + kl_factor · KL + v_weight_decay · ‖δ‖/‖h‖²."""
        hparams, active = self.hparams, batch.facts
        token_log_probs = heads.log_probs(readout[batch.gather_rows, batch.gather_positions]).gather(
            1, batch.gather_tokens[:, None]).squeeze(1)
        device = token_log_probs.device
        row_log_prob = torch.zeros(batch.n_rewrite, device=device).index_add(0, batch.gather_rows, token_log_probs)
        mean_log_prob = (row_log_prob * batch.row_weight).view(len(active), rows_per_fact).mean(dim=1)

        kl_log_probs = heads.log_probs(readout[batch.kl_rows, batch.kl_positions])
        if self.initial_kl is None:
            self.initial_kl = kl_log_probs.detach().clone()
        # KL(current || initial), as MEMIT's kl_div(initial, current, log_target=True).
        kl = (kl_log_probs.exp() * (kl_log_probs - self.initial_kl[active])).sum(dim=1)

        decay = self.delta[active].norm(dim=1) / self.initial[active].norm(dim=1) ** 2
        loss = -mean_log_prob + hparams.kl_factor * kl + hparams.v_weight_decay * decay
        self.losses[active.cpu()] = loss.detach().cpu()
        self.probabilities[active.cpu()] = mean_log_prob.detach().exp().cpu()
        return loss

    def freeze_converged(self, batch: _Batch, loss: torch.Tensor) -> torch.Tensor:
        """Freeze the facts whose loss fell below the stopping value; returns them."""
        done = batch.facts[loss.detach() < STOP_LOSS]
        if len(done):
            self.frozen_delta[done] = self.delta.detach()[done]
            self.frozen[done] = True
        return done

    def step(self, batch: _Batch, loss: torch.Tensor) -> None:
        """One Adam step on the facts still searched, then δ of frozen facts put back and ‖δ‖ clamped."""
        loss[~self.frozen[batch.facts]].sum().backward()
        self.optimizer.step()
        with torch.no_grad():
            self.delta[self.frozen] = self.frozen_delta[self.frozen]
            max_norm = self.hparams.clamp_norm_factor * self.initial.norm(dim=1)
            norms = self.delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
            self.delta.mul_(scale[:, None])

    def result(self, steps: int) -> TargetSearchResult:
        with torch.no_grad():
            delta = torch.where(self.frozen[:, None], self.frozen_delta, self.delta.detach())
        return TargetSearchResult(values=self.initial + delta, initial=self.initial.clone(),
                                  final_loss=self.losses.tolist(), target_probability=self.probabilities.tolist(),
                                  steps=steps)


@contextmanager
def _search_mode(model) -> Iterator[None]:
    """Eval mode and no parameter gradients during the search (only δ is optimised); put back afterwards."""
    grad_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _search(model, tok, prompts: Sequence[_FactPrompts], hparams, templates: ModuleTemplates, layer: int,
            rows_per_fact: int, use_prefix_cache: bool, replay_lower_blocks: bool) -> TargetSearchResult:
    """Optimise one δ per fact at block ``layer``; converged facts are frozen and leave the batch."""
    device = next(model.parameters()).device
    pad = pad_token_id(tok)
    heads = _Readout.of(model, hparams, templates, layer)
    search = _DeltaSearch(len(prompts), hidden_size(model), device, hparams)
    lower = [templates.layer_module_tmp.format(i) for i in range(layer + 1)] if replay_lower_blocks else []
    lower_outputs: Dict[str, Any] = {}  # each lower block's output in the first pass (its format, for the replay)
    step = 0
    with _search_mode(model):
        batch = _build_batch(model, prompts, list(range(len(prompts))), pad, device, use_prefix_cache)
        for step in range(hparams.v_num_grad_steps):
            search.optimizer.zero_grad()
            # Hooks only around the step's own pass: the prefix pass of a rebuilt batch runs without them.
            with contextlib.ExitStack() as hooks:
                if lower and batch.below is not None:
                    hooks.enter_context(replay_blocks(model, lower, lower_outputs, batch.below))
                elif lower:  # registered first: it sees the edited block's output before δ
                    lower_outputs = hooks.enter_context(record_outputs(model, lower))
                hooks.enter_context(edit_output(model, heads.edit_name,
                                                functools.partial(search.add_delta, batch, step == 0)))
                outputs = hooks.enter_context(capture_outputs(model, [heads.readout_name]))
                run = hooks.enter_context(stop_after(model, heads.readout_name))
                run(**batch.forward_inputs())
            if lower and batch.below is None:
                batch.below = block_output_hidden(lower_outputs[lower[-1]]).detach()
            loss = search.loss(batch, outputs[heads.readout_name], heads, rows_per_fact)
            if not torch.isfinite(loss).all():
                raise FloatingPointError(f"target search produced a non-finite loss at step {step}")
            logger.debug("target search step %d: losses %s", step, [round(v, 3) for v in search.losses.tolist()])
            done = search.freeze_converged(batch, loss)
            if bool(search.frozen.all()) or step == hparams.v_num_grad_steps - 1:
                break
            search.step(batch, loss)
            if len(done):  # the converged facts leave the batch
                batch = _build_batch(model, prompts, torch.nonzero(~search.frozen).flatten().tolist(), pad, device,
                                     use_prefix_cache, previous=batch)
    return search.result(steps=step + 1)


def compute_target_values_one_by_one(model, tok, requests, hparams, templates, layer, context_templates,
                                     use_prefix_cache: bool = True) -> TargetSearchResult:
    """The same search run fact by fact (the reference the batched search is measured against)."""
    return _in_fact_order([compute_target_values(model, tok, [request], hparams, templates, layer, context_templates,
                                                 use_prefix_cache=use_prefix_cache)
                           for request in requests], [[i] for i in range(len(requests))])
