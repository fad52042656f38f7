"""The hyperparameters every method shares, and the one yaml reader.

:class:`EditHyperParams` holds what the locate-then-edit family has in
common: the edited layers, the target search, the statistics corpus, the
null-space threshold, module templates and the run-time settings. Each
method's own class (``methods/<name>/hparams.py``) extends it with its
fields and its ``ALG_NAME``. The method's fields (what the papers tune) are
kept apart from the run-time settings (where the model lives, which device,
where caches go). Both are plain dataclass fields so that EasyEdit's
``BaseEditor`` and its evaluators, which read attributes such as
``alg_name``, ``model_name``, ``device`` and ``model_parallel`` off the
object, find what they expect.

:func:`read_yaml` is the one reader of EasyEdit-style yaml files; the
registry's ``load_hparams`` uses it to pick the class by ``alg_name``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, List, Optional, Tuple, Union

import yaml

from .null_space_projector import FORMS as PROJECTOR_FORMS
from .null_space_projector import RULES as NULLSPACE_RULES
from .run_settings import model_dtype_name

logger = logging.getLogger(__name__)

FACT_TOKEN_STRATEGIES = ("subject_last", "subject_first", "last")
MOM2_DTYPES = ("float32", "float64")
LAYER_SELECTIONS = ("all",)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class EditHyperParams:
    """What every method of the MEMIT family needs to edit one model (not used directly).

    Method fields follow AlphaEdit (Fang et al., ICLR 2025) and the MEMIT
    lineage it builds on; run-time fields say where things happen. Each
    method's class sets ``ALG_NAME`` and the ``alg_name`` default.
    """

    ALG_NAME: ClassVar[str] = ""

    # ---- the method -----------------------------------------------------
    layers: List[int] = _help("Indices of the transformer blocks whose MLP output projection is edited.")
    fact_token: str = _help(
        "Which token's key represents the subject: subject_last, subject_first or last.",
        default="subject_last",
    )
    v_num_grad_steps: int = _help("Gradient steps of the target-value search.", default=25)
    v_lr: float = _help("Adam learning rate of the target-value search.", default=0.5)
    v_loss_layer: int = _help("Block whose output is read out for the target loss (normally the last).", default=-1)
    v_weight_decay: float = _help("Weight on ‖δ‖/‖h‖² in the target-value search.", default=0.5)
    clamp_norm_factor: float = _help("‖δ‖ is clamped to this factor times ‖h‖ after each step.", default=0.75)
    kl_factor: float = _help("Weight of the KL term that keeps 'subject is a' predictions.", default=0.0625)
    nullspace_threshold: float = _help(
        "Eigenvalues of the count-normalised K0K0ᵀ below this are taken as the null space.", default=2e-2
    )
    nullspace_rule: str = _help(
        "How each layer's null space is chosen: 'threshold' (the paper's: eigenvalues below nullspace_threshold) "
        "or 'energy' (the smallest eigen-directions holding at most nullspace_energy of the trace, the same share "
        "in every layer).", default="threshold")
    nullspace_energy: float = _help(
        "With nullspace_rule: energy, the share of K0K0ᵀ's trace the null space may hold (0.3: about what "
        "nullspace_threshold 2e-2 leaves on SmolLM2's layers 4-8, 0.20-0.44).", default=0.3)
    L2: float = _help("Ridge term added to the constrained normal equations (Eq. 14).", default=10.0)
    mom2_dataset: str = _help(
        "Corpus for K0K0ᵀ: a local text file or folder, 'self' (text sampled from the model) "
        "or a datasets-hub name where a network allows it.",
        default="self",
    )
    mom2_n_samples: int = _help("Number of corpus texts used for the statistics.", default=100000)
    mom2_dtype: str = _help("Floating type the key products are formed in (float32 or float64).", default="float32")
    mom2_max_tokens: int = _help("Tokens per corpus text (texts are truncated to this).", default=256)
    mom2_heldout_fraction: float = _help(
        "Share of corpus texts kept out of the statistics to measure preservation on unseen keys.", default=0.05
    )
    layer_selection: str = _help("Kept for EasyEdit compatibility; only 'all' is meaningful.", default="all")
    P_loc: Optional[str] = _help(
        "A precomputed projector in EasyEdit's format: one (layers, d, d) tensor saved with torch.save, slice i the "
        "P of the i-th edited layer (the AlphaEdit authors distribute one for Llama-3-8B). Where the file exists "
        "it is used instead of computing P, after checking it against the model and layers; where it does not, P "
        "is computed from the statistics and cached in the cache folder (never written to P_loc). Relative paths "
        "are read from the working directory, as EasyEdit does.", default=None)
    context_template_count: int = _help("Generated context prefixes the keys and targets are averaged over.", default=5)
    context_template_length: int = _help("Tokens per generated context prefix.", default=10)

    # ---- architecture (None: taken from the table in architectures.py) --
    rewrite_module_tmp: Optional[str] = _help("Template of the edited module, e.g. model.layers.{}.mlp.down_proj.", default=None)
    layer_module_tmp: Optional[str] = _help("Template of a transformer block.", default=None)
    mlp_module_tmp: Optional[str] = _help("Template of a block's MLP.", default=None)
    attn_module_tmp: Optional[str] = _help("Template of a block's attention.", default=None)
    ln_f_module: Optional[str] = _help("Final norm before the language-model head.", default=None)
    lm_head_module: Optional[str] = _help("Language-model head.", default=None)

    # ---- run time -------------------------------------------------------
    alg_name: str = _help("The method's name (its class's ALG_NAME).", default="")
    model_name: Any = _help("Model path or id, or a (model, tokenizer) pair.", default=None)
    device: Union[int, str] = _help("cpu, cuda, cuda:N or an int N (EasyEdit style, meaning cuda:N).", default="cpu")
    stats_dir: Optional[str] = _help(
        "Cache folder for statistics and projectors; else $ALPHAEDIT_CACHE; else ~/.cache/alphaedit.", default=None
    )
    batch_size: int = _help("Requests per chunk in EasyEdit's batch_edit (its edit() needs 1).", default=1)
    max_length: int = _help("Maximum generation length used by EasyEdit evaluators.", default=40)
    model_parallel: bool = _help(
        "When the plugin loads the model by path: spread it over the available devices (device_map='auto'), as "
        "EasyEdit's loader does.", default=False)
    fp16: bool = _help("EasyEdit's spelling of dtype: float16 (true loads the model in float16).", default=False)
    dtype: Optional[str] = _help(
        "The model's dtype wherever the plugin loads it (BaseEditor with a path, alphaedit-bench, the demo): "
        "float32, bfloat16 or float16 (also fp32, bf16, fp16, torch.bfloat16). Left out: float16 with "
        "fp16: true, else float32. Statistics, projector and solve stay float32/float64 whatever it is.",
        default=None)
    trust_remote_code: bool = _help(
        "Passed to transformers when the plugin loads the model by path or hub id (models whose code lives "
        "in their repository).", default=False)
    projector_form: str = _help(
        "How P is kept: dense (the d x d matrix, as EasyEdit keeps it), factored (the smaller of its two "
        "factors, d x min(r, d - r), applied without a d x d matrix) or auto (factored from 4096 inputs on). "
        "The edit is the same either way.", default="auto")
    offload_editing_state: bool = _help(
        "Keep the editing state's per-layer matrices (P, the earlier edits' Kp Kpᵀ, C0, PRUNE's tensors) in CPU "
        "memory between edits; each layer's are copied to its weight's device for its solve and freed after.",
        default=False)
    statistics_memory_gb: float = _help(
        "GPU memory for the statistics' running sums (float32, d x d per layer): layers whose sums do not "
        "fit in it together are collected in separate passes over the corpus. On the CPU the sums go straight "
        "into float64 totals in one pass.", default=3.0)
    seed: int = _help("Seed for context-template sampling and self-corpus generation.", default=0)
    # Fields EasyEdit reads off MEMIT-style hparams; kept so its code paths find them.
    mom2_adjustment: bool = _help("Unused (EasyEdit's MEMIT-style yaml files carry it).", default=True)
    mom2_update_weight: float = _help(
        "λ of MEMIT's λ·C0 prior (C0: count-normalised K0K0ᵀ); used only by methods whose solve has that term.",
        default=15000)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is not allowed."""
        expected = type(self).ALG_NAME
        if self.alg_name != expected:
            raise ValueError(f"alg_name must be {expected!r} for {type(self).__name__}, got {self.alg_name!r}")
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ValueError(f"layers must be a non-empty list of block indices, got {self.layers!r}")
        if not all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in self.layers):
            raise ValueError(f"layers must hold non-negative integers, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers) or list(self.layers) != sorted(self.layers):
            raise ValueError(f"layers must be strictly increasing without repeats, got {self.layers!r}")
        self.layers = list(self.layers)
        if self.fact_token not in FACT_TOKEN_STRATEGIES:
            raise ValueError(f"fact_token must be one of {FACT_TOKEN_STRATEGIES}, got {self.fact_token!r}")
        if self.mom2_dtype not in MOM2_DTYPES:
            raise ValueError(f"mom2_dtype must be one of {MOM2_DTYPES}, got {self.mom2_dtype!r}")
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ValueError(f"layer_selection must be one of {LAYER_SELECTIONS}, got {self.layer_selection!r}")
        _require(self, "v_num_grad_steps", int, lambda v: v >= 1, "an integer >= 1")
        _require(self, "mom2_n_samples", int, lambda v: v >= 1, "an integer >= 1")
        _require(self, "mom2_max_tokens", int, lambda v: v >= 2, "an integer >= 2")
        _require(self, "context_template_count", int, lambda v: v >= 0, "an integer >= 0")
        _require(self, "context_template_length", int, lambda v: v >= 1, "an integer >= 1")
        _require(self, "batch_size", int, lambda v: v >= 1, "an integer >= 1")
        _require(self, "v_loss_layer", int, lambda v: True, "an integer (-1 means the last block)")
        _require(self, "v_lr", float, lambda v: v > 0, "a number > 0")
        _require(self, "v_weight_decay", float, lambda v: v >= 0, "a number >= 0")
        _require(self, "clamp_norm_factor", float, lambda v: v > 0, "a number > 0")
        _require(self, "kl_factor", float, lambda v: v >= 0, "a number >= 0")
        _require(self, "nullspace_threshold", float, lambda v: v > 0, "a number > 0")
        if self.nullspace_rule not in NULLSPACE_RULES:
            raise ValueError(f"nullspace_rule must be one of {NULLSPACE_RULES}, got {self.nullspace_rule!r}")
        _require(self, "nullspace_energy", float, lambda v: 0 < v < 1, "a number in (0, 1)")
        _require(self, "L2", float, lambda v: v > 0, "a number > 0 (it keeps the solve well posed)")
        _require(self, "mom2_heldout_fraction", float, lambda v: 0 <= v < 1, "a number in [0, 1)")
        _require(self, "mom2_update_weight", float, lambda v: v >= 0, "a number >= 0")
        _require(self, "seed", int, lambda v: True, "an integer")
        _require(self, "max_length", int, lambda v: v >= 1, "an integer >= 1")
        _require(self, "statistics_memory_gb", float, lambda v: v > 0, "a number of gigabytes > 0")
        if self.projector_form not in PROJECTOR_FORMS:
            raise ValueError(f"projector_form must be one of {PROJECTOR_FORMS}, got {self.projector_form!r}")
        if self.stats_dir is not None and not isinstance(self.stats_dir, (str, os.PathLike)):
            raise ValueError(f"stats_dir must be a folder path (or left out), got {self.stats_dir!r}")
        device = self.device
        if isinstance(device, bool) or not isinstance(device, (int, str)) or (isinstance(device, int) and device < 0):
            raise ValueError(f"device must be cpu, cuda, cuda:N or an index N >= 0, got {device!r}")
        if not isinstance(self.mom2_dataset, str) or not self.mom2_dataset:
            raise ValueError(f"mom2_dataset must be a non-empty string (a path, 'self' or a hub name), got {self.mom2_dataset!r}")
        if self.P_loc is not None and (not isinstance(self.P_loc, str) or not self.P_loc):
            raise ValueError(f"P_loc must be the path of a projector file (or left out), got {self.P_loc!r}")
        for name in ("model_parallel", "fp16", "trust_remote_code", "offload_editing_state"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        model_dtype_name(self.dtype, self.fp16)  # a name torch has, and no contradiction with fp16
        for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or "{}" not in value):
                raise ValueError(f"{name} must be a module path template containing '{{}}', got {value!r}")

    # ------------------------------------------------------------------
    @classmethod
    def from_hparams(cls, path: Union[str, os.PathLike]):
        """Read an EasyEdit-style yaml file (its ``alg_name`` must be this class's ``ALG_NAME``).

        As EasyEdit does, a path without ``.yaml`` gets the suffix added.
        """
        config, source = read_yaml(path)
        return cls.from_dict(config, source=source)

    @classmethod
    def from_dict(cls, config: dict, source: str = "hparams"):
        config = dict(config)
        alg_name = config.get("alg_name")
        if alg_name != cls.ALG_NAME:
            raise ValueError(f"{source}: alg_name must be {cls.ALG_NAME!r} for {cls.__name__}, got {alg_name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; allowed fields are {sorted(known)}")
        if "layers" not in config:
            raise ValueError(f"{source}: missing required field 'layers' (the blocks to edit, e.g. [4, 5, 6, 7, 8])")
        hparams = cls(**{key: _coerce_number(value) for key, value in config.items()})
        _log_unused_once(cls, [name for name in cls.UNUSED_FIELDS if name in config], source)
        return hparams

    def to_dict(self) -> dict:
        result = dataclasses.asdict(self)
        if not isinstance(self.model_name, (str, type(None))):
            result["model_name"] = repr(type(self.model_name))
        return result

    # ------------------------------------------------------------------
    @property
    def torch_device(self) -> str:
        """The device as torch understands it (EasyEdit writes ints for cuda:N)."""
        if isinstance(self.device, int) and not isinstance(self.device, bool):
            return f"cuda:{self.device}"
        return str(self.device)

    @property
    def model_dtype(self) -> str:
        """The model's dtype name (float32, bfloat16, float16) from ``dtype`` or ``fp16``."""
        return model_dtype_name(self.dtype, self.fp16)

    @property
    def label(self) -> str:
        """How tables and logs name the method (a variant's class adds its suffix, e.g. ``MEMIT+P``)."""
        return self.alg_name

    RUNTIME_FIELDS: ClassVar[Tuple[str, ...]] = (
        "alg_name", "model_name", "device", "stats_dir", "batch_size", "max_length", "model_parallel", "fp16",
        "dtype", "trust_remote_code", "projector_form", "offload_editing_state", "statistics_memory_gb",
        "mom2_adjustment", "mom2_update_weight")
    # Fields EasyEdit's yaml files carry that this method accepts and does not use (logged once at INFO).
    UNUSED_FIELDS: ClassVar[Tuple[str, ...]] = ("mom2_adjustment", "layer_selection")

    def method_fields(self) -> dict:
        """The fields that change what an edit computes (recorded in results and logs)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME_FIELDS}


def read_yaml(path: Union[str, os.PathLike]) -> Tuple[dict, str]:
    """``(fields, source)`` of an EasyEdit-style yaml file; as EasyEdit does, ``.yaml`` is added if missing."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    if not path.is_file():
        raise FileNotFoundError(f"hparams file not found: {path}")
    with open(path, "r", encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of hparams fields, got {type(config).__name__}")
    return config, str(path)


_LOGGED_UNUSED: set = set()


def _log_unused_once(cls: type, names: List[str], source: str) -> None:
    """Say once per class and field that a field EasyEdit's files carry is accepted but changes nothing."""
    new = [name for name in names if (cls, name) not in _LOGGED_UNUSED]
    if new:
        _LOGGED_UNUSED.update((cls, name) for name in new)
        logger.info("%s: %s accepted for EasyEdit compatibility; %s does not use %s", source, ", ".join(new),
                    cls.ALG_NAME, "them" if len(new) > 1 else "it")


def _coerce_number(value: Any) -> Any:
    """yaml reads '5e-1' (no dot) as a string; EasyEdit converts those, so do we."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if any(c in value.lower() for c in ("e", ".")) and not value.lower() in ("inf", "nan"):
            return number
    return value


def _require(hp: EditHyperParams, name: str, kind: type, ok, expected: str) -> None:
    value = getattr(hp, name)
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if kind is float and isinstance(value, int):
        value = float(value)
        setattr(hp, name, value)
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
