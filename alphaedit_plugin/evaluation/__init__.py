"""Evaluation suite: dataset loaders and the metrics of each benchmark family.

One module per family (``counterfact``, ``zsre``, ``knowedit``, ``mquake``,
``leme``), each with ``HEADLINE`` (its main metrics), ``reference(scorer,
cases, options)`` (what must be read from the unedited model, JSON-able) and
``evaluate(scorer, cases, reference, options)`` (a dict of figures in percent
plus ``notes``); ``glue`` (general capability) and ``representation``
(hidden-state shift) are evaluated beside them. See docs/evaluation.md.
"""

from . import counterfact, knowedit, leme, mquake, zsre
from .datasets import (DatasetError, EditCase, EditDataset, detect_schema, load_dataset, load_datasets,
                       normalise_answers)
from .scoring import EvalOptions, ModelScorer

FAMILY_MODULES = {"counterfact": counterfact, "zsre": zsre, "knowedit": knowedit, "mquake": mquake, "leme": leme}


def family_module(family: str):
    try:
        return FAMILY_MODULES[family]
    except KeyError:
        raise ValueError(f"unknown metric family {family!r}; known: {', '.join(sorted(FAMILY_MODULES))}") from None


__all__ = ["DatasetError", "EditCase", "EditDataset", "EvalOptions", "FAMILY_MODULES", "ModelScorer",
           "detect_schema", "family_module", "load_dataset", "load_datasets", "normalise_answers"]
