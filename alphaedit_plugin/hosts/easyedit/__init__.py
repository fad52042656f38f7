"""The plugin's methods inside EasyEdit: ``BaseEditor`` runs them when the hparams are the plugin's.

Importing this module registers every method of :mod:`alphaedit_plugin.registry`
where the ``easyeditor`` package is importable (without it the module still
imports, and :func:`register` raises an ``ImportError`` that says how to get the
host)::

    from easyeditor import BaseEditor
    from alphaedit_plugin import AlphaEditHyperParams   # `import alphaedit_plugin` registers the methods

    editor = BaseEditor.from_hparams(AlphaEditHyperParams.from_hparams("hparams/AlphaEdit/smollm2-135m.yaml"))
    metrics, edited_model, _ = editor.edit(prompts=[...], target_new=[...], subject=[...])

See docs/easyedit.md for the name-clash rule, the host compatibility fixes and
how sequential state is kept.
"""

import importlib.util as _importlib_util

from .adapter import EditingSession, apply_alphaedit_easyedit, apply_easyedit, get_state, reset_state
from .compat import HostInfo, inspect_host
from .registration import AlphaEditDispatcher, MethodDispatcher, is_registered, register, unregister

__all__ = [
    "AlphaEditDispatcher",
    "EditingSession",
    "HostInfo",
    "MethodDispatcher",
    "apply_alphaedit_easyedit",
    "apply_easyedit",
    "get_state",
    "inspect_host",
    "is_registered",
    "register",
    "reset_state",
    "unregister",
]

if _importlib_util.find_spec("easyeditor") is not None:
    try:
        register()
    except Exception as _error:  # an installed but broken host (e.g. PyPI easyeditor under transformers 5)
        import logging as _logging
        _logging.getLogger(__name__).warning(
            "alphaedit_plugin: easyeditor is importable but the methods could not be registered in it: %s: %s",
            type(_error).__name__, _error)
