"""The current EasyEdit's own AlphaEdit (and SPHERE), run as its users run it, for side-by-side benchmarks.

``alphaedit-bench --methods AlphaEdit AlphaEdit@host`` edits the same model
with the plugin and with the host's ``apply_AlphaEdit_to_model``
(``easyeditor/models/alphaedit/AlphaEdit_main.py``), which ``BaseEditor``
calls for ``alg_name: AlphaEdit``; ``SPHERE SPHERE@host`` likewise with the
host's ``apply_SPHERE_to_model`` (``easyeditor/models/SPHERE/SPHERE_main.py``:
a copy of AlphaEdit's module that damps each update with its
``sparse_projection`` where it writes it, with globals of its own). Which host
module runs is a :class:`HostCode`. The host's code runs unchanged: its
statistics (``layer_stats``, one pass over the corpus per layer), its
projector (``torch.linalg.svd`` of each layer's second moment), its target
search (``compute_z``, one fact at a time), its solve and its module-global
``P`` and ``cache_c``. Both take their settings from the same AlphaEdit yaml.

Four things around the call are arranged here, each because the host cannot
run offline or on this model otherwise (none changes what it computes):

1. Its statistics corpus is a Hugging Face hub name (``layer_stats`` calls
   ``datasets.load_dataset("Salesforce/wikitext", ...)``). While the host
   computes its statistics, its ``layer_stats`` reads the token sequences
   the plugin's own statistics read from ``mom2_dataset`` (the same texts,
   cut at ``mom2_max_tokens`` tokens, the held-out share left out), under the
   host's name ``wikitext2``; its loader, batching, hooks and sums are its own.
2. It picks the shape of P and of its key cache by substrings of
   ``model_name`` (``"llama"``, ``"qwen"``: a ``Linear`` down-projection;
   ``"gpt2-xl"``: a ``Conv1D``) and fails with a ``NameError`` on any other
   name (SmolLM2's). The host hparams carry ``model_name`` ``"llama"`` or
   ``"gpt2-xl"`` by the edited module's kind.
3. It recomputes P at every call unless ``P_loc`` names an existing file,
   and then writes it to ``null_space_project.pt`` in the working directory.
   P is computed once, with the host's own ``get_project``, and saved where
   ``P_loc`` points, in a scratch folder (removed with the object) that also
   holds the host's statistics cache; the host then uses it and writes
   nothing into the working directory.
4. Its globals (``P``, ``P_loaded``, ``cache_c``, ``cache_c_new``,
   ``COV_CACHE``, ``CONTEXT_TEMPLATES_CACHE``) are reset before a run, and
   ``P``, ``cache_c`` and the context prefixes are what the benchmark saves
   and restores between batches.

5. Its ``layer_stats`` caches each layer's statistics under
   ``stats_dir / f"{name}/wikitext2_stats/..."``, ``name`` the last part of
   ``model.config._name_or_path``, and loads that file whenever it exists,
   without checking what it was computed from. For a model built in code the
   name is empty, the path becomes ``/wikitext2_stats/...`` at the
   file-system root, and every such model reads the first one's statistics.
   While it computes its statistics a model without a name carries the name
   ``model`` (put back afterwards), so that its cache stays in the scratch
   folder.

The call itself goes through :func:`~alphaedit_plugin.hosts.easyedit.compat.host_step_call`
(the host's ``print`` to the log, right padding, ``requires_grad`` flags put back).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ...architectures import get_module, is_transposed, weight_as_out_in
from ...requests import normalise_requests
from .compat import host_step_call
from .memit_steps import fill_host_class, host_fields, host_request, import_host

logger = logging.getLogger(__name__)

HOST_CORPUS_NAME = "wikitext2"  # a key of the host's layer_stats dataset_map; its texts are ours (fix 1)
GLOBALS = ("P", "P_loaded", "cache_c", "cache_c_new")


@dataclass(frozen=True)
class HostCode:
    """One of the host's AlphaEdit-shaped modules: where it lives and what its hyperparameters add."""

    alg_name: str  # the host's alg_name, and the plugin method whose hparams it takes
    main_module: str  # has apply_<alg>_to_model, get_project, get_cov and the globals
    hparams_class: str  # "module:Class"
    apply_function: str
    extra_fields: Tuple[str, ...] = ()  # fields of the plugin's hparams passed on under the same name

    @property
    def label(self) -> str:
        return f"{self.alg_name}@host"


HOST_ALPHAEDIT_CODE = HostCode("AlphaEdit", "easyeditor.models.alphaedit.AlphaEdit_main",
                               "easyeditor.models.alphaedit.AlphaEdit_hparams:AlphaEditHyperParams",
                               "apply_AlphaEdit_to_model")
HOST_SPHERE_CODE = HostCode("SPHERE", "easyeditor.models.SPHERE.SPHERE_main",
                            "easyeditor.models.SPHERE.SPHERE_hparams:SPHEREHyperParams", "apply_SPHERE_to_model",
                            extra_fields=("cumulative_ratio", "suppression_strength"))


def host_alphaedit_modules(code: HostCode = HOST_ALPHAEDIT_CODE):
    """``(main module, layer_stats module, hyperparameter class)`` of ``code`` in the installed host."""
    return import_host(
        (code.main_module, "easyeditor.models.rome.layer_stats", code.hparams_class),
        f"{code.label} needs the current EasyEdit source (easyeditor with {code.main_module}) on sys.path",
        "Put ../shared/hosts/EasyEdit on PYTHONPATH")


def dispatch_model_name(model, rewrite_module_tmp: str, layer: int) -> str:
    """The ``model_name`` under which the host's substring dispatch shapes P for this model (fix 2)."""
    return "gpt2-xl" if is_transposed(get_module(model, rewrite_module_tmp.format(layer))) else "llama"


def host_alphaedit_hparams(model, hparams, templates, stats_dir: str, code: HostCode = HOST_ALPHAEDIT_CODE):
    """A real ``easyeditor`` hyperparameter object of ``code`` (``AlphaEditHyperParams``, ...) with our settings, its
    statistics cached in ``stats_dir``."""
    _, _, host_class = host_alphaedit_modules(code)
    ours = host_fields(model, hparams, templates, code.alg_name)
    ours.update({name: getattr(hparams, name) for name in code.extra_fields})
    ours.update({
        "nullspace_threshold": hparams.nullspace_threshold, "L2": hparams.L2,
        "mom2_dataset": HOST_CORPUS_NAME, "stats_dir": stats_dir,
        "P_loc": str(Path(stats_dir) / "null_space_project.pt"),  # written by compute_projectors (fix 3)
        "model_name": dispatch_model_name(model, templates.rewrite_module_tmp, hparams.layers[-1]),
    })
    return fill_host_class(host_class, ours, f"run the plugin's {code.alg_name} instead")


@contextlib.contextmanager
def host_reads_sequences(sequences: List[List[int]]) -> Iterator[None]:
    """While open, the host's ``layer_stats`` reads ``sequences`` (token ids) as its hub data set (fix 1).

    Its ``load_dataset`` returns nothing from the hub and its ``TokenizedDataset`` yields these ids in the
    items it yields for a text (``input_ids``, ``position_ids``, ``attention_mask``): decoding them to text
    and letting the host tokenize again would not give the same tokens for every tokenizer.
    """
    _, layer_stats, _ = host_alphaedit_modules()
    originals = layer_stats.load_dataset, layer_stats.TokenizedDataset

    def load_dataset(name, config=None, *args, **kwargs):
        logger.info("host layer_stats asked for %s/%s: given the %d token sequences of the plugin's corpus", name,
                    config, len(sequences))
        return {"train": sequences}

    class Sequences(torch.utils.data.Dataset):
        def __init__(self, given, tokenizer=None, maxlen=None, field="text"):
            self.rows = [list(ids)[:maxlen] if maxlen else list(ids) for ids in given]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            ids = torch.tensor(self.rows[i])
            return {"input_ids": ids, "position_ids": torch.arange(len(ids)),
                    "attention_mask": torch.ones_like(ids)}

    layer_stats.load_dataset, layer_stats.TokenizedDataset = load_dataset, Sequences
    try:
        yield
    finally:
        layer_stats.load_dataset, layer_stats.TokenizedDataset = originals


class HostAlphaEdit:
    """The host's AlphaEdit (or another :class:`HostCode`) on one model: its projectors, its edits and its global
    state, kept apart."""

    def __init__(self, model, tok, hparams, templates, workdir: Optional[Path] = None,
                 code: HostCode = HOST_ALPHAEDIT_CODE):
        """``workdir``: the folder for the host's files (its statistics cache, P), kept; default a scratch folder
        removed with the object."""
        self.model, self.tok, self.hparams, self.templates, self.code = model, tok, hparams, templates, code
        self.main, _, _ = host_alphaedit_modules(code)
        if workdir is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="alphaedit-host-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.scratch), True)
        else:
            self.scratch = Path(workdir).resolve()
            self.scratch.mkdir(parents=True, exist_ok=True)
            self._cleanup = lambda: None
        self.host_hparams = host_alphaedit_hparams(model, hparams, templates, str(self.scratch), code)

    def close(self) -> None:
        self._cleanup()

    def _keep_projector(self, projectors: torch.Tensor) -> None:
        """``P`` as the host keeps it: the global, marked loaded, and saved where ``P_loc`` points (fix 3)."""
        self.main.P, self.main.P_loaded = projectors, True
        torch.save(projectors, self.host_hparams.P_loc)

    @contextlib.contextmanager
    def _call(self, label: str) -> Iterator[None]:
        with host_step_call(self.model, self.tok, self.hparams.device, label=label):
            yield

    def reset(self) -> None:
        """The host's module globals as a fresh process has them (fix 4)."""
        for name in GLOBALS:
            if hasattr(self.main, name):
                delattr(self.main, name)
        self.main.P_loaded, self.main.cache_c_new = False, False
        self.main.COV_CACHE.clear()
        self.main.CONTEXT_TEMPLATES_CACHE = None

    @contextlib.contextmanager
    def _named_for_its_cache(self) -> Iterator[None]:
        """A model without ``_name_or_path`` named ``model`` for the host's statistics cache path (fix 5)."""
        config = self.model.config
        original = getattr(config, "_name_or_path", "")
        if str(original).rsplit("/")[-1]:
            yield
            return
        config._name_or_path = "model"
        try:
            yield
        finally:
            config._name_or_path = original

    def compute_projectors(self, sequences: List[List[int]]) -> None:
        """The host's statistics and P for every edited layer: the branch of ``apply_AlphaEdit_to_model`` that
        runs when ``P_loc`` does not exist, called on its own so that its time is reported apart."""
        self.reset()
        host = self.host_hparams
        weight = weight_as_out_in(get_module(self.model, self.templates.rewrite_module_tmp.format(host.layers[-1])))
        d_in = weight.shape[1]
        projectors = torch.zeros((len(host.layers), d_in, d_in), device="cpu")  # allocated as the host does
        with host_reads_sequences(sequences), self._named_for_its_cache(), \
                self._call(f"easyeditor {self.code.alg_name} statistics"):
            for i, layer in enumerate(host.layers):
                projectors[i, :, :] = self.main.get_project(self.model, self.tok, layer, host)
        self._keep_projector(projectors)

    def load_saved_projector(self) -> bool:
        """Start as the host's first edit would after a finished ``compute_projectors`` in another process: P
        from ``P_loc`` (as the host loads it) and its ``COV_CACHE`` from its own statistics cache, so that what
        it holds is what an uninterrupted run holds. False, changing nothing, where ``P_loc`` is absent."""
        saved = Path(self.host_hparams.P_loc)
        if not saved.is_file():
            return False
        self.load_state({"P": torch.load(saved, weights_only=True), "cache_c": None, "context_templates": None})
        host = self.host_hparams
        with self._named_for_its_cache(), self._call(f"easyeditor {self.code.alg_name} statistics (cached)"):
            for layer in host.layers:
                self.main.get_cov(self.model, self.tok, self.templates.rewrite_module_tmp.format(layer),
                                  host.mom2_dataset, host.mom2_n_samples, host.mom2_dtype, hparams=host)
        return True

    def edit(self, requests: List[Dict[str, Any]]) -> None:
        """One batch through the host's ``apply_AlphaEdit_to_model`` (``code.apply_function``), as
        ``BaseEditor.batch_edit`` calls it."""
        if not getattr(self.main, "P_loaded", False):
            raise RuntimeError(f"{self.code.label}: compute_projectors (or load_state) must run before edit")
        host_requests = [host_request(request) for request in normalise_requests(requests)]
        apply = getattr(self.main, self.code.apply_function)
        with self._call(f"easyeditor {self.code.alg_name}"):
            apply(self.model, self.tok, host_requests, self.host_hparams, copy=False, return_orig_weights=True,
                  keep_original_weight=False)

    def state(self) -> Dict[str, Any]:
        """What the host's later calls read from its globals: P, the key cache and the context prefixes (sampled
        at its first edit, without a seed: a resumed run must not sample others)."""
        return {"P": getattr(self.main, "P", None), "cache_c": getattr(self.main, "cache_c", None),
                "context_templates": self.main.CONTEXT_TEMPLATES_CACHE}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.reset()
        self._keep_projector(state["P"])
        if state.get("cache_c") is not None:
            self.main.cache_c, self.main.cache_c_new = state["cache_c"], True
        self.main.CONTEXT_TEMPLATES_CACHE = state.get("context_templates")
