"""Host compatibility: every place where the plugin works around EasyEdit itself.

Kept in this one module so that what is patched, when and why can be read in
one place (docs/easyedit.md repeats it). Each fix is gated on what
:func:`inspect_host` detects in the installed host, and is applied only to
calls made with the plugin's own hparams; the host's other methods are never
touched.

1. Hard-coded CUDA (PyPI ``easyeditor==0.0.1.dev0``). ``BaseEditor`` and the
   evaluators build device strings as ``f"cuda:{hparams.device}"``. With
   ``device: cpu`` that gives ``"cuda:cpu"``, which torch rejects. While a
   ``BaseEditor`` call runs with AlphaEdit hparams whose device is not a CUDA
   index, :func:`cuda_prefix_aliases` makes ``Tensor.to`` and ``Module.to``
   read a malformed ``"cuda:<device>"`` string as ``"<device>"``
   (``"cuda:cpu"`` -> ``"cpu"``, ``"cuda:cuda:1"`` -> ``"cuda:1"``). Strings
   torch accepts (``"cuda:0"``) are passed through unchanged, so the patch can
   only turn a crash into the intended placement, never change a working
   call. It is off where the host has no hard-coded CUDA (the current
   EasyEdit source) and where ``device`` is a CUDA index (``0``).
2. ``BatchEditor.is_batchable_method`` does not list every method of the
   plugin (the PyPI host: not AlphaEdit; the current source: not PRUNE or
   RECT), so ``batch_edit`` would refuse them; :func:`allow_batch_editing`
   adds the names it does not list.
3. The weights-copy contract differs between the hosts (see
   :class:`HostInfo.restores_only_kept_weights`); the adapter reads it from
   here instead of guessing.
4. Calling the host's own MEMIT steps (``compute_z``, ``compute_ks``;
   :mod:`alphaedit_plugin.hosts.easyedit.memit_steps`). Besides ``.to(...)`` they
   build tensors with ``torch.tensor(..., device=f"cuda:{device}")`` and
   ``torch.zeros(..., device=...)``, which fix 1 does not reach.
   :func:`host_step_call` runs such a call with a torch-function mode that
   reads a malformed ``"cuda:<device>"`` device argument of *any* torch
   function as ``"<device>"`` (same rule as fix 1), sends the host's
   ``print`` output to this module's logger at DEBUG, lets the tokenizer pad
   on the right for the call (the host's index arithmetic assumes it; the
   PyPI ``BaseEditor`` leaves MEMIT's tokenizer so) and puts back the
   ``requires_grad`` flags the host clears on every model parameter
   (``nethook.set_requires_grad(False, model)``).
5. A ``(model, tokenizer)`` pair whose tokenizer has no pad token (most
   Llama-family tokenizers, and SmolLM2's loaded the usual Hugging Face way).
   Both hosts set ``pad_token_id = eos_token_id`` when they load the tokenizer
   themselves, but not for a pair, and their pre-edit evaluation
   (``test_prediction_acc``) pads, so ``edit`` failed before the first edit.
   :func:`give_pad_token` does what the host's loader does, for our hparams
   only and only where the tokenizer has no pad token; one that has one is
   never changed. (The tokenizer object is the caller's: the pad token stays
   set on it, as it would on a tokenizer the host had loaded.)
6. Running the host's own AlphaEdit for a side-by-side benchmark
   (``AlphaEdit@host``): what is arranged around that call, and why, is in
   :mod:`alphaedit_plugin.hosts.easyedit.host_alphaedit` (it is not a call the
   plugin's users make through ``BaseEditor``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import io
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

ALG_NAME = "AlphaEdit"
_PATCH_MARK = "__alphaedit_plugin_patch__"


@dataclass(frozen=True)
class HostInfo:
    """What the installed EasyEdit host does, read from its code at registration time."""

    version: str
    # BaseEditor builds f"cuda:{...}" device strings (PyPI 0.0.1.dev0).
    hardcodes_cuda: bool
    # BatchEditor.is_batchable_method("AlphaEdit") is true.
    lists_alphaedit_as_batchable: bool
    # BaseEditor.edit has a sequential_edit argument (the current source).
    has_sequential_edit: bool
    # The host already ships its own "AlphaEdit" in ALG_DICT.
    has_own_alphaedit: bool

    @property
    def restores_only_kept_weights(self) -> bool:
        """True for the PyPI host: it restores weights from whatever ``weights_copy``
        an editor returns, and its editors return one only when called with
        ``keep_original_weight=True`` (else edits persist: sequential editing).
        The current source decides with ``sequential_edit`` instead and expects
        ``weights_copy`` whenever ``return_orig_weights`` is set."""
        return not self.has_sequential_edit


def inspect_host() -> HostInfo:
    """Read the host's behaviour from the installed ``easyeditor`` package."""
    import easyeditor
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.editors.editor import BaseEditor
    from easyeditor.util import alg_dict

    try:
        source = inspect.getsource(inspect.unwrap(BaseEditor.__init__)) + \
            inspect.getsource(inspect.unwrap(BaseEditor.edit))
    except (OSError, TypeError):  # no source (zipped install): assume the worst, gates still check the device
        source = 'f"cuda:{'
    try:
        from importlib.metadata import version
        host_version = version("easyeditor")
    except Exception:  # a source checkout on sys.path has no metadata
        host_version = getattr(easyeditor, "__version__", "source")
    own = alg_dict.ALG_DICT.get(ALG_NAME)
    if getattr(own, _PATCH_MARK, False):  # the plugin's dispatcher: look behind it
        own = getattr(own, "host_apply", None)
    return HostInfo(
        version=host_version,
        hardcodes_cuda="cuda:{" in source,
        lists_alphaedit_as_batchable=bool(_original(BatchEditor.is_batchable_method)(ALG_NAME)),
        has_sequential_edit="sequential_edit" in inspect.signature(inspect.unwrap(BaseEditor.edit)).parameters,
        has_own_alphaedit=own is not None,
    )


# ---------------------------------------------------------------------------
# 1. "cuda:<device>" strings built by the PyPI host
# ---------------------------------------------------------------------------
def translate_device(device: Any) -> Any:
    """``"cuda:cpu"`` -> ``"cpu"``; any device torch accepts is returned unchanged."""
    if isinstance(device, str) and device.startswith("cuda:"):
        rest = device[len("cuda:"):].strip()
        if rest and not rest.isdigit():
            return rest
    return device


def needs_cuda_aliases(host: HostInfo, device: Any) -> bool:
    """Whether ``f"cuda:{device}"`` built by this host would be an invalid device string."""
    if not host.hardcodes_cuda:
        return False
    if isinstance(device, bool):
        return True
    if isinstance(device, int):
        return False
    return translate_device(f"cuda:{device}") != f"cuda:{device}"


def _translating(method: Callable) -> Callable:
    @functools.wraps(method)
    def to(self, *args, **kwargs):
        if args:
            args = (translate_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = translate_device(kwargs["device"])
        return method(self, *args, **kwargs)

    setattr(to, _PATCH_MARK, True)
    return to


_ALIAS_TARGETS = ((torch.Tensor, "to"), (torch.nn.Module, "to"))


@contextmanager
def cuda_prefix_aliases() -> Iterator[None]:
    """Within the block, ``x.to("cuda:cpu")`` means ``x.to("cpu")`` (tensors and modules).

    Re-entrant: an inner block leaves the patch to the outer one.
    """
    installed = []
    for cls, name in _ALIAS_TARGETS:
        current = getattr(cls, name)
        if getattr(current, _PATCH_MARK, False):
            continue
        own = cls.__dict__.get(name)
        setattr(cls, name, _translating(current))
        installed.append((cls, name, own))
    try:
        yield
    finally:
        for cls, name, own in reversed(installed):
            if own is None:
                delattr(cls, name)
            else:
                setattr(cls, name, own)


def cuda_aliases_active() -> bool:
    return any(getattr(getattr(cls, name), _PATCH_MARK, False) for cls, name in _ALIAS_TARGETS)


# ---------------------------------------------------------------------------
# 2. BatchEditor does not list the plugin's methods (PyPI host: not AlphaEdit; current host: not PRUNE, RECT)
# ---------------------------------------------------------------------------
def _original(function: Callable) -> Callable:
    return getattr(function, "__wrapped__", function) if getattr(function, _PATCH_MARK, False) else function


_BATCHABLE: set = set()  # the plugin's method names that BatchEditor is made to accept


def allow_batch_editing(names) -> bool:
    """Let ``BatchEditor.is_batchable_method`` accept ``names`` (those it does not list already); True if the
    patch is installed now. Calls with other names reach the host's own function."""
    from easyeditor.editors.batch_editor import BatchEditor

    current = BatchEditor.is_batchable_method
    host_function = _original(current)
    _BATCHABLE.update(name for name in names if not host_function(name))
    if getattr(current, _PATCH_MARK, False) or not _BATCHABLE:
        return getattr(current, _PATCH_MARK, False)

    @functools.wraps(host_function)
    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in _BATCHABLE or host_function(alg_name)

    setattr(is_batchable_method, _PATCH_MARK, True)
    BatchEditor.is_batchable_method = staticmethod(is_batchable_method)
    logger.debug("easyeditor BatchEditor: %s added to the batchable methods", sorted(_BATCHABLE))
    return True


def disallow_batch_editing(names=None) -> None:
    """Take ``names`` (default: all) out again; the host's own function comes back when none is left."""
    from easyeditor.editors.batch_editor import BatchEditor

    if names is None:
        _BATCHABLE.clear()
    else:
        _BATCHABLE.difference_update(names)
    current = BatchEditor.is_batchable_method
    if getattr(current, _PATCH_MARK, False) and not _BATCHABLE:
        BatchEditor.is_batchable_method = staticmethod(current.__wrapped__)


# ---------------------------------------------------------------------------
# 5. A tokenizer without a pad token
# ---------------------------------------------------------------------------
def give_pad_token(tok) -> bool:
    """Set ``tok``'s pad token to its end-of-sequence token where it has none (as the host's loader does);
    True if it was set. A tokenizer with a pad token, or without an eos token, is left as it is."""
    if getattr(tok, "pad_token_id", None) is not None or getattr(tok, "eos_token", None) is None:
        return False
    tok.pad_token = tok.eos_token
    logger.info("the tokenizer has no pad token: using its end-of-sequence token %r, as EasyEdit does for the "
                "tokenizers it loads itself", tok.eos_token)
    return True


# ---------------------------------------------------------------------------
# 4. Calling the host's own MEMIT steps
# ---------------------------------------------------------------------------
class _DeviceStringMode(TorchFunctionMode):
    """Reads ``device="cuda:cpu"`` (or a first positional ``"cuda:cpu"`` of ``Tensor.to``) as ``"cpu"``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = translate_device(kwargs["device"])
        if len(args) > 1 and isinstance(args[1], str) and getattr(func, "__name__", "") == "to":
            args = (args[0], translate_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


class _LogWriter(io.TextIOBase):
    """A file object whose lines go to ``logger.debug`` (the host reports with ``print``)."""

    def __init__(self, prefix: str):
        self.prefix, self.pending = prefix, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                logger.debug("%s: %s", self.prefix, line)
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            logger.debug("%s: %s", self.prefix, self.pending)
        self.pending = ""


@contextmanager
def host_step_call(model, tok, device: Any, label: str = "easyeditor") -> Iterator[None]:
    """Run one call into the host's MEMIT code on ``model`` (see fix 4 in this module's docstring).

    The device-string translation is on only where ``f"cuda:{device}"`` would be invalid
    (``device`` ``"cpu"``, ``"cuda"``, ``"cuda:1"``); with a CUDA index the host's strings are valid
    and pass untouched. Everything changed here is put back when the block ends, also on error.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    padding_side = getattr(tok, "padding_side", None)
    translate = translate_device(f"cuda:{device}") != f"cuda:{device}" or isinstance(device, bool)
    writer = _LogWriter(label)
    try:
        if padding_side is not None:
            tok.padding_side = "right"
        with redirect_stdout(writer):
            if translate:
                with cuda_prefix_aliases(), _DeviceStringMode():
                    yield
            else:
                yield
    finally:
        writer.flush()
        if padding_side is not None:
            tok.padding_side = padding_side
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
