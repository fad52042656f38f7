"""Deprecated: MEMIT, PRUNE and RECT are methods of their own now (:mod:`alphaedit_plugin.methods`).

Every method, with or without AlphaEdit's projection P, runs through the one
edit loop: ``alphaedit_plugin.load_hparams(path)``, ``create_state`` and
``apply_to_model``. The names below keep working, with a ``DeprecationWarning``
on import.
"""

import warnings as _warnings

from ..edit_loop import LayerUpdates as ExecutorUpdate  # noqa: F401
from ..edit_loop import apply_to_model as apply_baseline_to_model  # noqa: F401
from ..edit_loop import check_delta, check_deltas  # noqa: F401
from ..edit_loop import create_state as create_baseline_state  # noqa: F401
from ..errors import DeltaError, ProjectorMismatchError  # noqa: F401
from ..layer_statistics import load_second_moments  # noqa: F401
from ..methods.delta_projection import apply_with_delta_projection  # noqa: F401
from ..methods.memit.hparams import MEMITHyperParams  # noqa: F401
from ..methods.memit.hparams import MEMITHyperParams as BaselineHyperParams  # noqa: F401
from ..methods.prune import PRUNEHyperParams, largest_sv, restrain_singular_values, restraint  # noqa: F401
from ..methods.rect import RECTHyperParams, relative_change_mask, sparsify_by_relative_change  # noqa: F401
from ..registry import hparams_class_for, load_hparams  # noqa: F401
from ..state import EditingState as BaselineState  # noqa: F401

_warnings.warn("alphaedit_plugin.baselines is deprecated; use alphaedit_plugin.load_hparams, create_state and "
               "apply_to_model (every method), or alphaedit_plugin.methods.<name>", DeprecationWarning, stacklevel=2)
