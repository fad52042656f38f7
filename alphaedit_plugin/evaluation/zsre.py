"""ZsRE metrics (AlphaEdit Eqs. 16-18; MEMIT's ``compute_rewrite_quality_zsre``).

Top-1 token accuracy, teacher-forced: for the answer's tokens y_1..y_m after
the prompt p, the share of positions j where argmax_y P(y | p, y_<j) = y_j.

- Efficacy (Eq. 16): on the question ``src`` with the new answer ``alt``.
- Generalization (Eq. 17): on the paraphrase ``rephrase`` with ``alt``.
- Specificity (Eq. 18): on the unrelated Natural Questions prompt ``loc`` + "?" with its
  true answer ``loc_ans`` (the unedited model itself often gets it wrong, hence the low
  figures, about 25-32 in the paper's Table 1).

Each figure is 100 × the mean over cases.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .datasets import EditCase
from .scoring import EvalOptions, percent, token_accuracy

HEADLINE = ["efficacy", "generalization", "specificity"]


def reference(scorer, cases: Sequence[EditCase], options: EvalOptions) -> List[Any]:
    return [None] * len(cases)


def evaluate(scorer, cases: Sequence[EditCase], reference_data: Sequence[Any], options: EvalOptions) -> Dict[str, Any]:
    pairs = []
    for case in cases:
        f = case.fields
        pairs += [(f["prompt"], f["target_new"]), (f["rephrase"], f["target_new"]), (f["loc"] + "?", f["loc_ans"])]
    predictions = scorer.token_predictions(pairs)
    accuracy = [token_accuracy(p, t) for p, t in predictions]
    return {"efficacy": percent(accuracy[0::3]), "generalization": percent(accuracy[1::3]),
            "specificity": percent(accuracy[2::3]), "notes": []}
