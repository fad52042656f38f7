"""Registration on ``import alphaedit_plugin``, where EasyEdit is importable.

The core package cannot import :mod:`alphaedit_plugin.hosts.easyedit`
unconditionally at its top (it needs ``easyeditor``, which the core does not
depend on). The core's ``__init__`` calls :func:`register_if_available`
instead: it does nothing where ``easyeditor`` cannot be found, and logs
(never raises) where it is there but cannot be imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

logger = logging.getLogger(__name__)


def register_if_available() -> bool:
    """Register the methods in EasyEdit if ``easyeditor`` is importable; True if they are registered now."""
    if importlib.util.find_spec("easyeditor") is None:
        return False
    try:
        module = importlib.import_module("alphaedit_plugin.hosts.easyedit")
    except Exception as error:  # a host that fails to import must not break the core package
        logger.warning("alphaedit_plugin: easyeditor is importable but the methods could not be registered "
                       "in it: %s: %s", type(error).__name__, error)
        return False
    try:
        return module.is_registered()
    except Exception as error:
        logger.warning("alphaedit_plugin: easyeditor is importable but broken: %s: %s", type(error).__name__, error)
        return False
