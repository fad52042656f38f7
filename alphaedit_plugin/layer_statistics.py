"""Statistics and projectors per edited layer: loaded from the cache, or computed once and cached.

One step, read top to bottom in :func:`load_or_compute_null_spaces`:

1. the key of each layer's statistics: the model (its id and a hash of every
   weight the layer's keys depend on: embeddings and blocks up to the layer),
   layer and module, the corpus (by content), the number of texts and tokens
   per text, the dtype (:func:`statistics_keys`);
2. a projector cached under that key plus the threshold is used as it is;
3. for the other layers the second moment K0K0ᵀ/N is read from the cache,
   and whatever is missing is computed in as few passes over the corpus as
   ``statistics_memory_gb`` allows (:func:`load_or_compute_second_moments`);
4. P is computed from each moment as soon as it is there, one layer at a
   time, in the form ``projector_form`` asks for (:mod:`.null_space_projector`),
   and cached.

Every cached file stores its key and is refused if the key differs (:mod:`.cache`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import cache, second_moment
from .architectures import ModuleTemplates, get_module, weight_as_out_in
from .corpus import corpus_identity, corpus_token_sequences
from .null_space_projector import (ProjectorTensor, null_space_projector, projector_file_entry, projector_form,
                                   projector_from_file_entry)
from .second_moment import TOKENS_PER_BATCH, SecondMoment, collect_second_moments, layer_groups

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class LayerNullSpace:
    projector: ProjectorTensor  # (d_in, d_in) float32, or its factored form (null_space_projector.py)
    rank: int
    heldout_keys: Optional[torch.Tensor]  # (m, d_in) float32, for the preservation figure
    token_count: int


def model_identity(model, hparams) -> str:
    if isinstance(hparams.model_name, str) and hparams.model_name:
        return hparams.model_name
    return getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or model.config.model_type


def heldout_every(hparams) -> int:
    """Every how many corpus texts one is held out of the statistics (0: none)."""
    return round(1 / hparams.mom2_heldout_fraction) if hparams.mom2_heldout_fraction > 0 else 0


def statistics_texts(model, tok, hparams) -> Tuple[List[List[int]], List[List[int]]]:
    """``(texts the statistics are made from, texts they hold out)``: the token sequences of ``mom2_dataset``
    split as :func:`second_moment.is_heldout` splits them."""
    sequences = corpus_token_sequences(hparams.mom2_dataset, model, tok, hparams.mom2_n_samples,
                                       hparams.mom2_max_tokens, hparams.seed)
    every = heldout_every(hparams)
    kept, held_out = [], []
    for index, ids in enumerate(sequences):
        (held_out if second_moment.is_heldout(index, every) else kept).append(list(ids))
    return kept, held_out


def key_parameters(model, templates: ModuleTemplates, last_layer: int) -> Iterator[Tuple[str, torch.Tensor, Optional[int]]]:
    """``(name, parameter, block)`` of every weight the keys of blocks 0..``last_layer`` depend on, in the model's
    order: the embeddings and other shared parameters (block None) and the parameters of those blocks. The final
    norm and the head are left out: nothing below them depends on them."""
    block_prefix = {i: templates.layer_module_tmp.format(i) + "." for i in range(last_layer + 1)}
    outside = (templates.ln_f_module + ".", templates.lm_head_module + ".")
    blocks_root = templates.layer_module_tmp.split("{}")[0]  # e.g. "model.layers."
    for name, parameter in model.named_parameters():
        block = next((i for i, prefix in block_prefix.items() if name.startswith(prefix)), None)
        if block is not None:
            yield name, parameter, block
        elif not name.startswith(outside) and not name.startswith(blocks_root):
            yield name, parameter, None


def key_weight_fingerprints(model, templates: ModuleTemplates, layers: List[int]) -> Dict[int, str]:
    """Per layer, a hash of every weight the keys at that layer depend on.

    The input of block l's output projection depends on the embeddings and on
    blocks 0..l; those parameters (block l's own included) are hashed, each
    tensor once, and combined per layer.
    """
    shared, per_block = [], {i: [] for i in range(max(layers) + 1)}
    for name, parameter, block in key_parameters(model, templates, max(layers)):
        (shared if block is None else per_block[block]).append(f"{name}:{cache.tensor_sha256(parameter)}")
    result, running = {}, list(shared)
    for i in sorted(per_block):
        running.extend(per_block[i])
        if i in layers:
            result[i] = cache.digest({"weights": running})
    return result


SAMPLED_ELEMENTS = 4096


def unedited_weights_fingerprint(model, templates: ModuleTemplates, layers: List[int]) -> str:
    """A hash of what an editing state belongs to: every weight the edited layers' keys depend on
    (:func:`key_parameters`) except the edited modules' own weights, which the edits change.

    Each tensor contributes its name, shape, dtype and an evenly strided sample of at most
    ``SAMPLED_ELEMENTS`` entries: another checkpoint (a fine-tuned model under the same name) differs
    everywhere, and the check costs milliseconds where a full hash of an 8B model's blocks takes seconds at
    every edit.
    """
    edited = {templates.rewrite_module_tmp.format(layer) + ".weight" for layer in layers}
    sha = hashlib.sha256()
    for name, parameter, _ in key_parameters(model, templates, max(layers)):
        if name in edited:
            continue
        flat = parameter.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // SAMPLED_ELEMENTS)][:SAMPLED_ELEMENTS].to("cpu").contiguous()
        sha.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}:".encode())
        sha.update(sample.view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def statistics_keys(model, hparams, templates: ModuleTemplates) -> Dict[int, dict]:
    """The cache key of every edited layer's second moment."""
    corpus = corpus_identity(hparams.mom2_dataset, hparams.mom2_max_tokens, hparams.seed)
    fingerprints = key_weight_fingerprints(model, templates, hparams.layers)
    return {layer: {
        "kind": "second_moment",
        "format": FORMAT_VERSION,
        "model": model_identity(model, hparams),
        "weights_sha256": fingerprints[layer],
        "layer": layer,
        "module": templates.rewrite_module_tmp.format(layer),
        **corpus,
        "n_samples": hparams.mom2_n_samples,
        "dtype": hparams.mom2_dtype,
        "heldout_every": heldout_every(hparams),
    } for layer in hparams.layers}


def projector_key(statistics_key: dict, threshold: float, form: str = "dense", energy: Optional[float] = None) -> dict:
    """The key of a cached projector; the dense form's key under the paper's rule is the one earlier versions
    wrote."""
    return {**statistics_key, "kind": "projector", "threshold": threshold,
            **({"form": form} if form != "dense" else {}), **({"energy": energy} if energy is not None else {})}


def null_space_energy(hparams) -> Optional[float]:
    """The energy share of ``nullspace_rule: energy``, or None under the paper's threshold rule."""
    return hparams.nullspace_energy if hparams.nullspace_rule == "energy" else None


def _file_stem(key: dict) -> str:
    return f"{cache.slug(key['module'])}__{cache.slug(key['corpus'])}__n{key['n_samples']}__{key['dtype']}"


def statistics_path(root: Path, key: dict) -> Path:
    return root / "stats" / cache.slug(key["model"]) / f"{_file_stem(key)}__{cache.digest(key)}.pt"


def projector_path(root: Path, key: dict, threshold: float, form: str = "dense", energy: Optional[float] = None) -> Path:
    suffix = "" if form == "dense" else f"__{form}"
    rule = f"thr{threshold:g}" if energy is None else f"energy{energy:g}"
    digest = cache.digest(projector_key(key, threshold, form, energy))
    return root / "stats" / cache.slug(key["model"]) / "projectors" / f"{_file_stem(key)}__{rule}{suffix}__{digest}.pt"


# ---------------------------------------------------------------------------
def load_or_compute_null_spaces(model, tok, hparams, templates: ModuleTemplates) -> Dict[int, LayerNullSpace]:
    """The projector (and held-out keys) of every edited layer."""
    root = cache.cache_root(hparams.stats_dir)
    threshold, energy = hparams.nullspace_threshold, null_space_energy(hparams)
    keys = statistics_keys(model, hparams, templates)
    weights = {layer: weight_as_out_in(get_module(model, key["module"])) for layer, key in keys.items()}
    forms = {layer: projector_form(weight.shape[1], hparams.projector_form) for layer, weight in weights.items()}
    result: Dict[int, LayerNullSpace] = {}
    for layer, key in keys.items():
        path = projector_path(root, key, threshold, forms[layer], energy)
        stored = cache.load_keyed(path, projector_key(key, threshold, forms[layer], energy))
        if stored is not None:
            projector = projector_from_file_entry(stored["projector"])
            logger.info("layer %d: using cached projector (null-space rank %d of %d, %s) from %s", layer,
                        stored["rank"], projector.shape[0], forms[layer], path)
            result[layer] = LayerNullSpace(projector, int(stored["rank"]), stored["heldout_keys"],
                                           int(stored["token_count"]))
    to_compute = {layer: key for layer, key in keys.items() if layer not in result}
    if to_compute:
        seconds = {}

        def projector_of(layer: int, stored: dict) -> LayerNullSpace:
            started = time.perf_counter()
            space = _projector_from(stored, layer, threshold, root, keys[layer], forms[layer], weights[layer].device,
                                    energy)
            seconds[layer] = round(time.perf_counter() - started, 2)
            return space  # the moment itself is dropped here: one layer's moment in memory at a time

        result.update(load_or_compute_second_moments(model, tok, hparams, templates, to_compute, root,
                                                     then=projector_of))
        logger.info("projectors computed in %s s per layer", seconds)
    return {layer: result[layer] for layer in hparams.layers}


def eigh_device(layer_device: torch.device, d_in: int) -> torch.device:
    """Where a layer's eigendecomposition runs: on its weight's GPU where that has room for the float64 moment,
    its eigenvectors and the workspace (about 4·8·d² bytes), else on the CPU."""
    if layer_device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(layer_device)
    return layer_device if free > 4 * 8 * d_in * d_in else torch.device("cpu")


def _projector_from(stored: dict, layer: int, threshold: float, root: Path, key: dict, form: str,
                    layer_device: torch.device, energy: Optional[float] = None) -> LayerNullSpace:
    d_in = stored["moment"].shape[0]
    moment = stored["moment"].to(eigh_device(layer_device, d_in))
    projector = null_space_projector(moment, threshold, name=f"layer {layer}", form=form, energy=energy)
    del moment
    rule = f"threshold {threshold:g}" if energy is None else f"at most {energy:g} of the trace"
    logger.info("layer %d: null-space rank %d of %d (%s, %d tokens)", layer, projector.rank, d_in, rule,
                stored["count"])
    if projector.rank == d_in:
        logger.warning("layer %d: every direction counts as null (%s): the projection constrains nothing; lower "
                       "nullspace_threshold (or nullspace_energy)", layer, rule)
    kept = projector.stored.float().cpu()
    payload = {"projector": projector_file_entry(kept), "rank": projector.rank,
               "heldout_keys": stored["heldout_keys"], "token_count": int(stored["count"]),
               "eigenvalues": projector.eigenvalues}
    cache.save_keyed(projector_path(root, key, threshold, form, energy), projector_key(key, threshold, form, energy),
                     payload)
    return LayerNullSpace(kept, projector.rank, stored["heldout_keys"], int(stored["count"]))


def load_or_compute_second_moments(model, tok, hparams, templates: ModuleTemplates,
                                   keys: Optional[Dict[int, dict]] = None,
                                   root: Optional[Path] = None,
                                   then: Optional[Callable[[int, dict], Any]] = None) -> Dict[int, Any]:
    """``{layer: {"moment", "count", "heldout_keys"}}`` for ``keys`` (default: every edited layer), or, with
    ``then``, ``{layer: then(layer, that dict)}``, called as each layer's moment is read or computed so that
    only one is held at a time.

    Cached files are used; the layers without one are computed together, in as few passes over the corpus as
    ``statistics_memory_gb`` allows (:func:`.second_moment.layer_groups`).
    """
    root = root if root is not None else cache.cache_root(hparams.stats_dir)
    keys = keys if keys is not None else statistics_keys(model, hparams, templates)
    then = then or (lambda layer, stored: stored)
    moments: Dict[int, Any] = {}
    for layer, key in keys.items():
        stored = cache.load_keyed(statistics_path(root, key), key)
        if stored is not None:
            logger.info("layer %d: using cached statistics (%d tokens) from %s", layer, stored["count"],
                        statistics_path(root, key))
            moments[layer] = then(layer, stored)
            del stored
    missing = {layer: key for layer, key in keys.items() if layer not in moments}
    if missing:
        started = time.perf_counter()
        moments.update(_compute_second_moments(model, tok, hparams, templates, missing, root, then))
        logger.info("statistics for layers %s computed in %.1f s", sorted(missing), time.perf_counter() - started)
    return {layer: moments[layer] for layer in keys}


def load_second_moments(model, tok, hparams, templates: ModuleTemplates) -> Dict[int, torch.Tensor]:
    """C0 = K0K0ᵀ/N per edited layer, float64 (MEMIT's prior), from the cache or computed."""
    stored = load_or_compute_second_moments(model, tok, hparams, templates)
    return {layer: value["moment"].to(torch.float64) for layer, value in stored.items()}


def _compute_second_moments(model, tok, hparams, templates, keys: Dict[int, dict], root: Path,
                            then: Callable[[int, dict], Any]) -> Dict[int, Any]:
    sequences = corpus_token_sequences(hparams.mom2_dataset, model, tok, hparams.mom2_n_samples,
                                       hparams.mom2_max_tokens, hparams.seed)
    dtype = getattr(torch, hparams.mom2_dtype)
    weights = {layer: weight_as_out_in(get_module(model, key["module"])) for layer, key in keys.items()}
    widths = {layer: weight.shape[1] for layer, weight in weights.items()}
    on_device = any(second_moment.accumulates_on_device(weight.device) for weight in weights.values())
    # The budget is the GPU's: on the CPU the sums are the float64 totals, and one pass serves every layer.
    groups = layer_groups(widths, dtype, hparams.statistics_memory_gb * 2 ** 30) if on_device else [sorted(keys)]
    if len(groups) > 1:
        logger.info("statistics in %d passes over the corpus (layers %s): their %s sums do not fit "
                    "statistics_memory_gb = %g together", len(groups), groups, hparams.mom2_dtype,
                    hparams.statistics_memory_gb)
    stats = {}
    for number, group in enumerate(groups, 1):
        group_keys = {layer: keys[layer] for layer in group}
        partial_key = {"kind": "partial_second_moment", "layers": {str(l): k for l, k in group_keys.items()},
                       "tokens_per_batch": TOKENS_PER_BATCH}
        partial_path = (root / "stats" / cache.slug(group_keys[group[0]]["model"]) /
                        f"partial__{cache.digest(partial_key)}.pt")
        moments: Dict[int, SecondMoment] = collect_second_moments(
            model, tok, sequences,
            module_names={layer: key["module"] for layer, key in group_keys.items()},
            stop_module=templates.layer_module_tmp.format(max(group)),
            heldout_every=heldout_every(hparams),
            dtype=dtype,
            checkpoint_path=partial_path,
            checkpoint_key=partial_key,
            tokens_per_batch=TOKENS_PER_BATCH,
            description="second-moment statistics" + (f", pass {number} of {len(groups)}" if len(groups) > 1 else ""),
        )
        for layer in group:
            moment = moments.pop(layer)
            stored = {"moment": moment.moment, "count": moment.count, "heldout_keys": moment.heldout_keys}
            del moment
            cache.save_keyed(statistics_path(root, keys[layer]), keys[layer], stored)
            stats[layer] = then(layer, stored)
            del stored
    return stats
