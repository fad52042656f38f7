"""Files keyed by what they were computed from.

Every cached file stores its key inside; on load the stored key must equal
the expected one, or the file is refused with a message saying what differs.
Files are written atomically (temporary file, then rename), so an
interrupted write never leaves a half file under the final name.

The cache folder is the hparams field ``stats_dir``, else the environment
variable ``ALPHAEDIT_CACHE``, else ``$XDG_CACHE_HOME/alphaedit`` (by default
``~/.cache/alphaedit``); never the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

ENV_VAR = "ALPHAEDIT_CACHE"


class CacheError(RuntimeError):
    pass


class CacheMismatchError(CacheError):
    """A cached file's stored key differs from the key it was looked up by."""


class CorruptCacheError(CacheError):
    """A cached file cannot be read."""


def cache_root(stats_dir: Optional[str] = None) -> Path:
    if stats_dir:
        root = Path(stats_dir).expanduser()
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec: an empty or relative value is invalid and must be ignored.
        base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
        root = base / "alphaedit"
    return root.resolve()


def digest(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """A file-name-safe rendering that keeps the organisation part of model ids."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "unnamed"


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def _normalised(key: Dict[str, Any]) -> Dict[str, Any]:
    """The key as it reads back from a file (tuples become lists, odd types strings)."""
    return json.loads(json.dumps(key, default=str))


def save_keyed(path: Path, key: Dict[str, Any], payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"key": _normalised(key), **payload}, temporary)
    os.replace(temporary, path)


def load_keyed(path: Path, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The payload stored at ``path`` under ``key``; None if there is no file."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for a damaged file
        raise CorruptCacheError(f"cache file {path} cannot be read ({type(error).__name__}: {error}); "
                                "delete it to recompute") from error
    if not isinstance(stored, dict) or "key" not in stored:
        raise CorruptCacheError(f"cache file {path} holds no key; delete it to recompute")
    stored_key = stored.pop("key")
    expected = _normalised(key)
    if stored_key != expected:
        differing = sorted(k for k in set(stored_key) | set(expected) if stored_key.get(k) != expected.get(k))
        raise CacheMismatchError(
            f"cache file {path} was computed for a different key (fields that differ: {differing}); "
            "refusing to use it. Delete it, or point stats_dir / ALPHAEDIT_CACHE elsewhere"
        )
    return stored
