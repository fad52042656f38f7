"""Registration on ``import alphaedit_plugin``, where EasyEdit is installed.

The core package cannot import :mod:`alphaedit_plugin.easyedit` unconditionally
(it needs ``easyeditor``, which the core does not depend on). The core's
``__init__`` calls :func:`register_if_available` instead: it does nothing
where ``easyeditor`` is not installed, and logs (never raises) where it is
installed but cannot be imported.

Nothing in ``alphaedit_plugin.easyedit`` imports ``easyeditor`` at import
time except the registration call in its ``__init__``, which runs only where
``easyeditor`` is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

logger = logging.getLogger(__name__)


def register_if_available() -> bool:
    """Register AlphaEdit in EasyEdit if ``easyeditor`` is installed; True if it is registered now."""
    if importlib.util.find_spec("easyeditor") is None:
        return False
    try:
        module = importlib.import_module("alphaedit_plugin.easyedit")
        importlib.import_module("alphaedit_plugin.baselines")  # registers MEMIT, PRUNE and RECT (with and without P)
    except Exception as error:  # a host that fails to import must not break the core package
        logger.warning("alphaedit_plugin: easyeditor is installed but AlphaEdit could not be registered "
                       "in it: %s: %s", type(error).__name__, error)
        return False
    return module.is_registered()
