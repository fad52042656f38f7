"""The run-time settings a user names as strings: the model's dtype and the device.

Both are checked before anything loads, with an error that names the field
and the value. The model's dtype only decides how the model is loaded: keys,
statistics, the projector and the solve are formed in float32/float64
whatever it is (see ``mom2_dtype``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

# The dtypes a model is edited in, by their torch names; the spellings users also write map onto them.
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


class SettingError(ValueError):
    """A run-time setting that cannot be honoured (the message names the field and the value)."""


def canonical_dtype(value: Union[str, torch.dtype], field: str = "dtype") -> str:
    """``value`` as one of :data:`MODEL_DTYPES` (``bf16`` -> ``bfloat16``, ``torch.float16`` -> ``float16``)."""
    if isinstance(value, torch.dtype):
        name = str(value).replace("torch.", "")
    elif isinstance(value, str):
        name = value.strip().lower().replace("torch.", "")
        name = DTYPE_ALIASES.get(name, name)
    else:
        raise SettingError(f"{field} must be a dtype name ({', '.join(MODEL_DTYPES)}), got {value!r}")
    if name in MODEL_DTYPES:
        return name
    expected = f"one of {', '.join(MODEL_DTYPES)} (or {', '.join(sorted(DTYPE_ALIASES))})"
    if isinstance(getattr(torch, name, None), torch.dtype):
        raise SettingError(f"{field} {value!r} is a torch dtype but not one a model is edited in; expected {expected}")
    raise SettingError(f"{field} {value!r} is not a torch dtype; expected {expected}")


def torch_dtype(value: Union[str, torch.dtype], field: str = "dtype") -> torch.dtype:
    return getattr(torch, canonical_dtype(value, field))


def model_dtype_name(dtype: Optional[str], fp16: bool, source: str = "hparams") -> str:
    """The model's dtype from the two spellings: ``dtype`` and EasyEdit's ``fp16: true``.

    ``fp16: true`` means float16; with a ``dtype`` that says otherwise it is refused.
    """
    if dtype is None:
        return "float16" if fp16 else "float32"
    name = canonical_dtype(dtype, f"{source}: dtype")
    if fp16 and name != "float16":
        raise SettingError(f"{source}: fp16: true (EasyEdit's spelling of dtype float16) contradicts dtype: {dtype}; "
                           "keep one of them")
    return name


def check_device(device: Union[str, int, torch.device], field: str = "device") -> torch.device:
    """The device, refused with a clear message where this machine does not have it."""
    given = device
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # EasyEdit's spelling
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise SettingError(f"{field} {device!r} is not a device torch knows (cpu, cuda, cuda:N, mps): {error}") from None
    if given is not device:
        field = f"{field} {given!r} ="
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else \
                f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
            raise SettingError(f"{field} {device!r}: {built}; use cpu, or run where a GPU is visible")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise SettingError(f"{field} {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
                               f"cuda:{count - 1}")
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SettingError(f"{field} {device!r}: MPS is not available on this machine; use cpu")
    elif resolved.type not in ("cpu", "cuda", "mps", "meta"):
        raise SettingError(f"{field} {device!r}: the plugin edits on cpu, cuda or mps")
    return resolved


def check_weights_in_memory(model) -> None:
    """Refuse a model some of whose weights accelerate keeps offloaded (on the ``meta`` device, loaded by hooks
    at each forward: ``device_map="auto"`` on a model larger than its devices, or a ``"disk"`` entry), before any
    work: the edit reads and writes the edited weights in place and runs the target search's backward pass
    through the blocks above them, which hook-loaded weights do not allow."""
    offloaded = sorted({name.rsplit(".", 1)[0] for name, parameter in model.named_parameters()
                        if parameter.device.type == "meta"})
    if not offloaded:
        return
    shown = ", ".join(offloaded[:6]) + (f" and {len(offloaded) - 6} more" if len(offloaded) > 6 else "")
    raise SettingError(
        f"the model has weights that accelerate keeps offloaded (on the 'meta' device, loaded at each forward): "
        f"{shown}. The plugin edits weights in place and back-propagates through the blocks above the edited "
        "ones, so every weight must be in memory: load the model with a device_map whose devices hold all of it "
        "(more GPUs, or max_memory that leaves nothing to 'disk' or 'meta'), or load it on the CPU")
