"""KnowEdit metrics (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for LLMs").

The definitions are EasyEdit's (``easyeditor.evaluate.compute_edit_quality``
and ``test_prediction_acc``), reimplemented here because the host's
evaluators move every tensor to ``cuda:{device}`` and cannot run on a CPU:

- Edit Succ.: teacher-forced top-1 token accuracy of ``target_new`` after ``prompt``
  (EasyEdit's ``rewrite_acc``, ``token_em``). For WikiBio the prompt is ``text`` and the
  target the sentence in ``labels``.
- Generalization: the same on ``rephrase_prompt`` where the file has one (KnowEdit ZsRE).
- Portability: token accuracy of the portability ground truth after each portability prompt
  (Reasoning, Subject_Aliasing, Logical_Generalization), after editing. A ground truth may list
  aliases and, in wiki_recent, several answers each with aliases (``[["English", "en"], ["French"]]``):
  a probe scores the best accuracy over all listed aliases of all answers (any correct answer counts).
- Locality: share of answer positions whose top-1 prediction after editing equals the
  prediction before editing, on each locality prompt followed by its first listed answer
  (EasyEdit compares pre- and post-edit ``*_output`` token lists the same way).
- Fluency: n-gram entropy (:mod:`.fluency`) of text generated from the edit prompt.

Per case, each figure is the mean over its probes; the reported figure is 100 × the mean over
the cases that have such probes (cases without portability probes are left out of Portability).
Per-kind figures are reported as ``portability/<kind>`` and ``locality/<kind>``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .datasets import EditCase
from .fluency import fluency
from .scoring import EvalOptions, percent, token_accuracy, token_agreement

HEADLINE = ["edit_succ", "portability", "locality", "fluency"]


def _locality_pairs(case: EditCase):
    return [(kind, probe["prompt"], probe["answers"][0][0])
            for kind, probes in sorted(case.fields["locality"].items()) for probe in probes]


def reference(scorer, cases: Sequence[EditCase], options: EvalOptions) -> List[List[List[int]]]:
    """Top-1 predictions of the unedited model on every locality probe, per case."""
    flat, layout = [], []
    for case in cases:
        pairs = _locality_pairs(case)
        layout.append(len(pairs))
        flat += [(prompt, answer) for _, prompt, answer in pairs]
    predictions = [p for p, _ in scorer.token_predictions(flat)] if flat else []
    result, at = [], 0
    for n in layout:
        result.append(predictions[at:at + n])
        at += n
    return result


def evaluate(scorer, cases: Sequence[EditCase], reference_data: Sequence[List[List[int]]],
             options: EvalOptions) -> Dict[str, Any]:
    if len(reference_data) != len(cases):
        raise ValueError(f"locality reference holds {len(reference_data)} cases, evaluation {len(cases)}")
    pairs: List = []
    plan = []  # per case: list of (metric, kind, [pair indices])
    for case in cases:
        f = case.fields
        items = [("edit_succ", None, [len(pairs)])]
        pairs.append((f["prompt"], f["target_new"]))
        if f.get("rephrase"):
            items.append(("generalization", None, [len(pairs)]))
            pairs.append((f["rephrase"], f["target_new"]))
        for kind, probes in sorted(f["portability"].items()):
            for probe in probes:
                indices = []
                for answer in probe["answers"]:
                    for alias in answer:
                        indices.append(len(pairs))
                        pairs.append((probe["prompt"], alias))
                items.append(("portability", kind, indices))
        for kind, prompt, answer in _locality_pairs(case):
            items.append(("locality", kind, [len(pairs)]))
            pairs.append((prompt, answer))
        plan.append(items)
    predictions = scorer.token_predictions(pairs)

    per_case: Dict[str, List[float]] = {}
    for case_items, before in zip(plan, reference_data):
        scores: Dict[str, List[float]] = {}
        locality_at = 0
        for metric, kind, indices in case_items:
            if metric == "locality":
                value = token_agreement(before[locality_at], predictions[indices[0]][0])
                locality_at += 1
            else:
                value = max(token_accuracy(*predictions[i]) for i in indices)
            scores.setdefault(metric, []).append(value)
            if kind is not None:
                scores.setdefault(f"{metric}/{kind}", []).append(value)
        for name, values in scores.items():
            per_case.setdefault(name, []).append(sum(values) / len(values))
    result: Dict[str, Any] = {name: percent(per_case.get(name, [])) for name in
                              ["edit_succ", "generalization", "portability", "locality"]}
    result.update({name: percent(values) for name, values in sorted(per_case.items()) if "/" in name})
    notes = []
    for name in ("portability", "locality"):
        n = len(per_case.get(name, []))
        if n < len(cases):
            notes.append(f"{name}: {len(cases) - n} of {len(cases)} cases have no {name} probes"
                         + (" (not applicable)" if n == 0 else ""))
    result["fluency"] = None
    if options.fluency:
        texts = scorer.generate([c.fields["prompt"] for c in cases], options.generation_tokens, sample=True,
                                seed=options.seed)
        result["fluency"] = fluency([c.fields["prompt"] + t for c, t in zip(cases, texts)])
    else:
        notes.append("fluency: not computed (generation is off; pass --fluency)")
    result["notes"] = notes
    return result
