"""What a method supplies to the one edit loop, and where targets and keys come from.

The edit loop (:mod:`alphaedit_plugin.edit_loop`) runs MEMIT's recipe for
every method: the target search at the last edited layer, then layer by
layer the keys, the residual spread over the layers left, the solve, and
the write, atomically, with the state committed last. A method supplies
only what differs, by overriding:

- :meth:`EditMethod.solve_terms`: which terms its normal equations have
  (:class:`~alphaedit_plugin.constrained_solve.SolveTerms`: P, MEMIT's λ·C0
  prior, the earlier edits' keys, the ridge); the loop solves them, and it is
  there, in one place, that P enters;
- :meth:`EditMethod.finalize`: what it does to a layer's solved update before
  it is written and the next layer's keys are read (RECT sparsifies);
- :meth:`EditMethod.combine`: what is written, given all layers' updates and
  the weights (PRUNE restrains the accumulated update), and the running sums
  it keeps in the state;
- :meth:`EditMethod.initial_tensors`: what it keeps from the unedited model;
- :meth:`EditMethod.steps`: where the target values and keys come from
  (:class:`PluginSteps` by default; the EasyEdit host's own MEMIT steps
  with ``memit_steps: easyeditor``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from ..compute_keys import compute_keys_and_current_values
from ..compute_targets import TargetSearchResult, compute_target_values
from ..constrained_solve import SolveTerms
from ..requests import EditRequest

TensorsByLayer = Dict[int, torch.Tensor]


class PluginSteps:
    """The plugin's target search (batched over the facts) and its context-averaged keys."""

    label = "plugin"

    def __init__(self, hparams):
        self.hparams = hparams

    def compute_targets(self, model, tok, requests: Sequence[EditRequest], templates, value_layer: int,
                        context_templates: List[List[str]]) -> TargetSearchResult:
        """The target hidden states V1 at block ``value_layer`` (MEMIT's ``compute_z``, batched)."""
        return compute_target_values(model, tok, requests, self.hparams, templates, value_layer, context_templates)

    def compute_keys(self, model, tok, requests: Sequence[EditRequest], templates, layer: int, value_layer: int,
                     context_templates: List[List[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(keys (n, d_in), current values (n, d_hidden))`` for the weights now in the model: MEMIT's
        ``compute_ks`` and the block output at ``value_layer`` the residual is measured against."""
        return compute_keys_and_current_values(model, tok, requests, templates, layer, value_layer,
                                               context_templates, self.hparams.fact_token)


class EditMethod:
    """A method of the MEMIT family as the edit loop sees it; the defaults are MEMIT's steps."""

    def __init__(self, hparams):
        self.hparams = hparams

    @property
    def label(self) -> str:
        return self.hparams.label

    def identity(self) -> Dict[str, Any]:
        """Settings besides the shared ones that make a state this method's own (part of the state identity)."""
        return {}

    def steps(self):
        """Where the target values and the keys come from."""
        return PluginSteps(self.hparams)

    def solve_terms(self) -> SolveTerms:
        raise NotImplementedError(f"{type(self).__name__} must say which terms its solve has (solve_terms)")

    @property
    def needs_second_moments(self) -> bool:
        """Whether the state must hold C0 (the solve has MEMIT's λ·C0 prior)."""
        return self.solve_terms().mom2_prior_weight is not None

    def finalize(self, layer: int, delta: torch.Tensor, weight: torch.Tensor, state) -> torch.Tensor:
        """A layer's update as it will be written, from the solved one; ``weight`` is (out, in)."""
        return delta

    def combine(self, deltas: Mapping[int, torch.Tensor], weights: Mapping[int, torch.Tensor],
                state) -> Tuple[TensorsByLayer, Dict[str, TensorsByLayer]]:
        """``(changes to write per layer, new running sums for the state)`` given the weights now in the model."""
        return dict(deltas), {}

    def initial_tensors(self, weights: Mapping[int, torch.Tensor]) -> Tuple[Dict[str, TensorsByLayer],
                                                                             Dict[str, TensorsByLayer]]:
        """``(reference tensors, running sums)`` the state starts with, from the unedited (out, in) weights."""
        return {}, {}
