"""Statistics and projectors per layer, computed once and cached on disk.

Cache keys name the model (its id and a hash of every weight the layer's
keys depend on: embeddings and blocks up to the layer),
the layer and module, the corpus (by content), the number of texts and
tokens per text, the dtype and, for projectors, the threshold. The key is
stored inside each file and checked on load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import cache
from .architectures import ModuleTemplates, get_module, weight_as_out_in
from .corpus import corpus_identity, corpus_token_sequences
from .projector import null_space_projector
from .second_moment import TOKENS_PER_BATCH, SecondMoment, collect_second_moments

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class LayerNullSpace:
    projector: torch.Tensor  # (d_in, d_in) float32
    rank: int
    heldout_keys: Optional[torch.Tensor]  # (m, d_in) float32, for the preservation figure
    token_count: int


def model_identity(model, hparams) -> str:
    if isinstance(hparams.model_name, str) and hparams.model_name:
        return hparams.model_name
    return getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or model.config.model_type


def _heldout_every(hparams) -> int:
    return round(1 / hparams.mom2_heldout_fraction) if hparams.mom2_heldout_fraction > 0 else 0


def key_weight_fingerprints(model, templates: ModuleTemplates, layers: List[int]) -> Dict[int, str]:
    """Per layer, a hash of every weight the keys at that layer depend on.

    The input of block l's output projection depends on the embeddings and on
    blocks 0..l; those parameters (block l's own included) are hashed, each
    tensor once, and combined per layer. The final norm and the head are left
    out: nothing below them depends on them.
    """
    block_prefix = {i: templates.layer_module_tmp.format(i) + "." for i in range(max(layers) + 1)}
    outside = (templates.ln_f_module + ".", templates.lm_head_module + ".")
    blocks_root = templates.layer_module_tmp.split("{}")[0]  # e.g. "model.layers."
    shared, per_block = [], {i: [] for i in block_prefix}
    for name, parameter in model.named_parameters():
        block = next((i for i, prefix in block_prefix.items() if name.startswith(prefix)), None)
        if block is not None:
            per_block[block].append(f"{name}:{cache.tensor_sha256(parameter)}")
        elif not name.startswith(outside) and not name.startswith(blocks_root):
            shared.append(f"{name}:{cache.tensor_sha256(parameter)}")
    result, running = {}, list(shared)
    for i in sorted(block_prefix):
        running.extend(per_block[i])
        if i in layers:
            result[i] = cache.digest({"weights": running})
    return result


def statistics_key(model, hparams, templates: ModuleTemplates, layer: int, corpus: dict,
                   fingerprint: str) -> dict:
    module = templates.rewrite_module_tmp.format(layer)
    return {
        "kind": "second_moment",
        "format": FORMAT_VERSION,
        "model": model_identity(model, hparams),
        "weights_sha256": fingerprint,
        "layer": layer,
        "module": module,
        **corpus,
        "n_samples": hparams.mom2_n_samples,
        "dtype": hparams.mom2_dtype,
        "heldout_every": _heldout_every(hparams),
    }


def _paths(root: Path, key: dict, threshold: Optional[float] = None) -> Path:
    folder = root / "stats" / cache.slug(key["model"])
    name = f"{cache.slug(key['module'])}__{cache.slug(key['corpus'])}__n{key['n_samples']}__{key['dtype']}"
    if threshold is None:
        return folder / f"{name}__{cache.digest(key)}.pt"
    return folder / "projectors" / f"{name}__thr{threshold:g}__{cache.digest({**key, 'threshold': threshold})}.pt"


def prepare_null_spaces(model, tok, hparams, templates: ModuleTemplates) -> Dict[int, LayerNullSpace]:
    """Load or compute the projector (and held-out keys) for every edited layer."""
    root = cache.cache_root(hparams.stats_dir)
    corpus = corpus_identity(hparams.mom2_dataset, hparams.mom2_max_tokens, hparams.seed)
    fingerprints = key_weight_fingerprints(model, templates, hparams.layers)
    keys = {layer: statistics_key(model, hparams, templates, layer, corpus, fingerprints[layer])
            for layer in hparams.layers}
    result: Dict[int, LayerNullSpace] = {}
    stats: Dict[int, Dict] = {}
    missing: List[int] = []
    for layer, key in keys.items():
        projector_key = {**key, "kind": "projector", "threshold": hparams.nullspace_threshold}
        stored = cache.load_keyed(_paths(root, key, hparams.nullspace_threshold), projector_key)
        if stored is not None:
            logger.info("layer %d: using cached projector (null-space rank %d of %d) from %s", layer,
                        stored["rank"], stored["projector"].shape[0], _paths(root, key, hparams.nullspace_threshold))
            result[layer] = LayerNullSpace(stored["projector"], int(stored["rank"]), stored["heldout_keys"],
                                           int(stored["token_count"]))
            continue
        stored = cache.load_keyed(_paths(root, key), key)
        if stored is not None:
            logger.info("layer %d: using cached statistics (%d tokens) from %s", layer, stored["count"],
                        _paths(root, key))
            stats[layer] = stored
        else:
            missing.append(layer)

    if missing:
        started = time.perf_counter()
        stats.update(_compute_statistics(model, tok, hparams, templates, {l: keys[l] for l in missing}, root))
        logger.info("statistics for layers %s computed in %.1f s", missing, time.perf_counter() - started)

    started = time.perf_counter()
    for layer, stored in stats.items():
        projector = null_space_projector(stored["moment"], hparams.nullspace_threshold, name=f"layer {layer}")
        d_in = projector.matrix.shape[0]
        logger.info("layer %d: null-space rank %d of %d (threshold %g, %d tokens)", layer, projector.rank, d_in,
                    hparams.nullspace_threshold, stored["count"])
        if projector.rank == d_in:
            logger.warning("layer %d: every direction counts as null (threshold %g above all eigenvalues): the "
                           "projection constrains nothing; lower nullspace_threshold", layer, hparams.nullspace_threshold)
        payload = {"projector": projector.matrix.float(), "rank": projector.rank, "heldout_keys": stored["heldout_keys"],
                   "token_count": int(stored["count"]), "eigenvalues": projector.eigenvalues}
        projector_key = {**keys[layer], "kind": "projector", "threshold": hparams.nullspace_threshold}
        cache.save_keyed(_paths(root, keys[layer], hparams.nullspace_threshold), projector_key, payload)
        result[layer] = LayerNullSpace(payload["projector"], projector.rank, stored["heldout_keys"], int(stored["count"]))
    if stats:
        logger.info("projectors for layers %s computed in %.1f s", sorted(stats), time.perf_counter() - started)
    return {layer: result[layer] for layer in hparams.layers}


def _compute_statistics(model, tok, hparams, templates, keys: Dict[int, dict], root: Path) -> Dict[int, Dict]:
    sequences = corpus_token_sequences(hparams.mom2_dataset, model, tok, hparams.mom2_n_samples,
                                       hparams.mom2_max_tokens, hparams.seed)
    partial_key = {"kind": "partial_second_moment", "layers": {str(l): k for l, k in keys.items()},
                   "tokens_per_batch": TOKENS_PER_BATCH}
    any_key = next(iter(keys.values()))
    partial_path = root / "stats" / cache.slug(any_key["model"]) / f"partial__{cache.digest(partial_key)}.pt"
    moments: Dict[int, SecondMoment] = collect_second_moments(
        model, tok, sequences,
        module_names={layer: key["module"] for layer, key in keys.items()},
        stop_module=templates.layer_module_tmp.format(max(keys)),
        heldout_every=_heldout_every(hparams),
        dtype=getattr(torch, hparams.mom2_dtype),
        checkpoint_path=partial_path,
        checkpoint_key=partial_key,
        tokens_per_batch=TOKENS_PER_BATCH,
    )
    stats = {}
    for layer, moment in moments.items():
        stored = {"moment": moment.moment, "count": moment.count, "heldout_keys": moment.heldout_keys}
        cache.save_keyed(_paths(root, keys[layer]), keys[layer], stored)
        stats[layer] = stored
    return stats


def weight_of(model, templates: ModuleTemplates, layer: int) -> torch.Tensor:
    return weight_as_out_in(get_module(model, templates.rewrite_module_tmp.format(layer)))
