"""Computing what comes before the subject once, for the target search.

The target search adds δ at the subject's token and reads the loss from the
tokens after it; every token before the subject token is unaffected by δ, so
its keys and values are the same at every step. They are computed once per
batch (one forward pass, no gradient) and each step runs only the suffix that
starts at the subject token: for CounterFact prompts behind a ten-token
context prefix that is about a fifth of the tokens.

Rows are split at their own subject token, so prefixes are left-padded and
suffixes right-padded to a common width, with explicit position ids and one
attention mask over both. Works with transformers' ``Cache`` objects and
with models that still use tuples of (key, value) per layer.

Left-padding the prefixes keeps each row's prefix next to its suffix, so the
distance between two tokens in cache columns equals their distance in
positions, and a sliding-window mask (Mistral, Gemma 2/3) sees the same keys
as in the full pass, provided the cache keeps every prefix key: the prefix
pass gets a cache without windows, and a cache that still dropped keys is
refused. Refused as well (the caller falls back to the full pass, with a log
line saying why):

- blocks with a recurrent state (Qwen3.5's gated delta net, Mamba-style
  layers; ``config.layer_types`` other than full or sliding attention). A
  transformers forward of several tokens restarts that state instead of
  continuing the cached one (only single-token decoding reads it), so the
  suffix would not see its prefix at all;
- chunked attention (``attention_chunk_size``), whose chunk boundaries are
  absolute cache columns that left-padding shifts.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .architectures import text_config

logger = logging.getLogger(__name__)


@dataclass
class PrefixSplit:
    """Model inputs for the suffixes, with the prefixes' keys and values computed once."""

    suffix_ids: torch.Tensor  # (rows, S), right-padded
    attention_mask: torch.Tensor  # (rows, P + S): left-padded prefix mask, then the suffix mask
    position_ids: torch.Tensor  # (rows, S)
    key_values: List[Tuple[torch.Tensor, torch.Tensor]]  # per layer, (rows, heads, P, head_dim)
    as_cache_object: bool  # the model returned a Cache object (else legacy tuples)

    cache_argument: str = "past_key_values"  # newer transformers call it "cache"

    def forward_inputs(self) -> Dict[str, Any]:
        return {"input_ids": self.suffix_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, self.cache_argument: self.fresh_cache(), "use_cache": True}

    def select(self, rows: Sequence[int]) -> "PrefixSplit":
        """The split of a subset of the rows (in the order given), without another prefix pass.

        Used when facts leave the target search: their rows are dropped, the others' prefix keys and
        values are kept. Columns that only the dropped rows needed stay as masked padding.
        """
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.suffix_ids.device)
        return PrefixSplit(suffix_ids=self.suffix_ids[index], attention_mask=self.attention_mask[index],
                           position_ids=self.position_ids[index],
                           key_values=[(k[index.to(k.device)], v[index.to(v.device)]) for k, v in self.key_values],
                           as_cache_object=self.as_cache_object, cache_argument=self.cache_argument)

    def fresh_cache(self):
        """A new cache holding only the prefixes (the forward pass appends the suffix to it)."""
        if not self.as_cache_object:
            return tuple((k, v) for k, v in self.key_values)
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.key_values):
            cache.update(keys, values, layer)
        return cache


# Layer types whose cache is keys and values only (anything else, e.g. "linear_attention", "mamba", "conv",
# "hybrid", "chunked_attention", holds state that the prefix split cannot carry over).
KEY_VALUE_LAYER_TYPES = ("full_attention", "sliding_attention")


def unsupported_reason(model) -> Optional[str]:
    """Why the prefix cannot be computed once for this model (from its config), or None where it can."""
    config = text_config(model)
    layer_types = list(getattr(config, "layer_types", None) or [])
    other = sorted(set(layer_types) - set(KEY_VALUE_LAYER_TYPES))
    if other:
        return (f"{type(model).__name__} has blocks of type {other}, whose recurrent or convolution state a "
                "multi-token forward restarts instead of continuing from a cached prefix")
    if getattr(config, "attention_chunk_size", None):
        return f"{type(model).__name__} uses chunked attention, whose chunks left-padding the prefixes would shift"
    return None


def _has_sliding_window(model) -> bool:
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None) or []
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in layer_types


def _cache_argument(module) -> str:
    """What the module's forward calls its cache ("cache" in some newer transformers models)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _key_value_pairs(cache) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], bool]:
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v in cache], False
    if hasattr(cache, "layers"):  # transformers 5.x
        for index, layer in enumerate(cache.layers):
            if getattr(layer, "conv_states", None) is not None or getattr(layer, "recurrent_states", None) is not None \
                    or not isinstance(getattr(layer, "keys", None), torch.Tensor):
                raise ValueError(f"layer {index} of the cache is a {type(layer).__name__}, not keys and values only")
        return [(layer.keys, layer.values) for layer in cache.layers], True
    if hasattr(cache, "key_cache"):  # transformers 4.4x
        return list(zip(cache.key_cache, cache.value_cache)), True
    raise TypeError(f"unknown cache type {type(cache).__name__}")


@torch.no_grad()
def split_at(model, sequences: Sequence[Sequence[int]], split_points: Sequence[int], pad: int, device) -> PrefixSplit:
    """Run every row's tokens before ``split_points[row]`` once and prepare the suffix inputs.

    Raises ``ValueError`` if the model's cache cannot be used this way (see the module's docstring);
    callers fall back to the full pass.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(reason)
    prefixes = [list(seq[:cut]) for seq, cut in zip(sequences, split_points)]
    suffixes = [list(seq[cut:]) for seq, cut in zip(sequences, split_points)]
    width_p = max(len(p) for p in prefixes)
    width_s = max(len(s) for s in suffixes)
    if width_p == 0:
        raise ValueError("no row has a prefix to cache")
    rows = len(sequences)
    prefix_ids = torch.full((rows, width_p), pad, dtype=torch.long)
    prefix_mask = torch.zeros((rows, width_p), dtype=torch.long)
    suffix_ids = torch.full((rows, width_s), pad, dtype=torch.long)
    suffix_mask = torch.zeros((rows, width_s), dtype=torch.long)
    for row, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
        if prefix:
            prefix_ids[row, width_p - len(prefix):] = torch.tensor(prefix)
            prefix_mask[row, width_p - len(prefix):] = 1
        suffix_ids[row, : len(suffix)] = torch.tensor(suffix)
        suffix_mask[row, : len(suffix)] = 1
    prefix_positions = (prefix_mask.cumsum(dim=1) - 1).clamp_min(0)
    lengths = prefix_mask.sum(dim=1, keepdim=True)
    suffix_positions = lengths + torch.arange(width_s)[None, :]
    # The decoder alone (model.model, model.transformer, ...): the keys and values are the same, and the
    # output head's logits over the whole vocabulary, for every prefix token, are not needed.
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    runner = decoder if isinstance(decoder, torch.nn.Module) else model
    extra = {}
    if _has_sliding_window(model):  # a cache without windows keeps every prefix key; the suffix's mask applies them
        from transformers import DynamicCache

        extra[_cache_argument(runner)] = DynamicCache()
    output = runner(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                    position_ids=prefix_positions.to(device), use_cache=True, **extra)
    returned = output.get("cache") if "cache" in output else output.get("past_key_values")
    key_values, as_object = _key_value_pairs(returned)
    if not key_values or not all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in key_values):
        raise ValueError("the prefix pass produced no or non-finite keys/values")
    kept = sorted({int(k.shape[-2]) for k, _ in key_values})
    if kept != [width_p]:
        raise ValueError(f"the prefix cache holds {kept} columns per layer instead of all {width_p} prefix columns "
                         "(a sliding-window cache that drops keys)")
    return PrefixSplit(
        suffix_ids=suffix_ids.to(device),
        attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1).to(device),
        position_ids=suffix_positions.to(device),
        key_values=[(k.detach(), v.detach()) for k, v in key_values],
        as_cache_object=as_object,
        cache_argument=_cache_argument(model),
    )
