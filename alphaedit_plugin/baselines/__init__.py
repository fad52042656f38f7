"""MEMIT, PRUNE and RECT, each with and without AlphaEdit's null-space projection P.

    from alphaedit_plugin.baselines import load_hparams, apply_baseline_to_model, create_baseline_state
    hparams = load_hparams("hparams/PRUNE/smollm2-135m-projected.yaml")   # alg_name: PRUNE, projection: true
    state = create_baseline_state(model, tok, hparams)
    model, _ = apply_baseline_to_model(model, tok, requests, hparams, state=state)

See docs/baselines.md. Where the EasyEdit host (``easyeditor``) is installed,
importing this package registers MEMIT (next to the host's own, chosen by the
hparams class), PRUNE and RECT in its ``ALG_DICT``.
"""

import importlib.util as _importlib_util

from .hparams import (BaselineHyperParams, MEMITHyperParams, PRUNEHyperParams, RECTHyperParams, hparams_class_for,
                      load_hparams)
from .memit import (DeltaError, ExecutorUpdate, MEMITExecutor, apply_baseline_to_model, check_deltas, executor_class,
                    memit_update)
from .projection import (NullSpaceProjection, ProjectorMismatchError, apply_with_delta_projection, project_delta,
                         projected_update, with_projection)
from .prune import PRUNEExecutor, largest_sv, restrain_singular_values, restraint
from .rect import RECTExecutor, relative_change_mask, sparsify_by_relative_change
from .state import BaselineState, create_baseline_state, load_second_moments

__all__ = [
    "BaselineHyperParams", "BaselineState", "DeltaError", "ExecutorUpdate", "MEMITExecutor", "MEMITHyperParams",
    "NullSpaceProjection", "PRUNEExecutor", "PRUNEHyperParams", "ProjectorMismatchError", "RECTExecutor",
    "RECTHyperParams", "apply_baseline_to_model", "apply_with_delta_projection", "check_deltas",
    "create_baseline_state", "executor_class", "hparams_class_for", "load_hparams", "load_second_moments",
    "memit_update", "project_delta", "projected_update", "relative_change_mask", "restrain_singular_values",
    "largest_sv", "restraint", "sparsify_by_relative_change", "with_projection",
]

if _importlib_util.find_spec("easyeditor") is not None:
    try:
        from .easyedit import register as _register

        _register()
    except Exception as _error:  # an installed but broken host must not break the package
        import logging as _logging
        _logging.getLogger(__name__).warning("alphaedit_plugin.baselines: easyeditor is installed but MEMIT/PRUNE/"
                                             "RECT could not be registered in it: %s: %s", type(_error).__name__, _error)
