"""Deprecated: the EasyEdit integration moved to :mod:`alphaedit_plugin.hosts.easyedit`.

The names users call keep working here (``reset_state``, ``get_state``,
``register``, ...), with a ``DeprecationWarning`` on import.
"""

import warnings as _warnings

from ..hosts.easyedit import (AlphaEditDispatcher, EditingSession, HostInfo, MethodDispatcher,  # noqa: F401
                              apply_alphaedit_easyedit, apply_easyedit, get_state, inspect_host, is_registered,
                              register, reset_state, unregister)
from ..hosts.easyedit import adapter, compat, registration  # noqa: F401

_warnings.warn("alphaedit_plugin.easyedit is deprecated; use alphaedit_plugin.hosts.easyedit",
               DeprecationWarning, stacklevel=2)
