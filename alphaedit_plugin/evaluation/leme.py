"""LEME metrics (Rosati et al. 2024, "Long-form evaluation of model editing"), lexical versions.

LEME files are CounterFact (ROME format) or zsRE (MEND format) records with
``coupled_prompts_and_properties``: a ``subject_entity`` (a ``coupled_prompt``
asking for a passage about the subject and its ``ground_truth`` properties
``{property: [values]}``) and ``coupled_entities`` (related entities, each with
its ground truth, ``ground_truth`` or ``overlapping_ground_truth``). The LEME
data itself is not available offline here: the loader and these metrics are
tested on fixtures written in that schema.

LEME scores passages with human-calibrated NLI and LLM judges, which need
models that are not available offline. Computed here, from one greedy
passage per prompt (``generation_tokens`` new tokens):

- ``edit_mention``: share of passages about the subject that name the new target
  (a lexical proxy of LEME's edit consistency; higher is better);
- ``old_mention``: share that still name the old target (lower is better);
- ``subject_fact_recall``: mean share of the subject's other ground-truth values named in
  its passage (proxy of factual consistency: the rest of what is known about the subject);
- ``related_fact_recall``: the same for the first coupled entity's passage (long-form locality);
- ``fluency``: n-gram entropy of all passages (:mod:`.fluency`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .datasets import EditCase
from .fluency import fluency
from .mquake import matches
from .scoring import EvalOptions, percent

HEADLINE = ["edit_mention", "old_mention", "subject_fact_recall", "related_fact_recall", "fluency"]


def subject_prompt(case: EditCase) -> str:
    return f"{case.fields['subject_prompt'].rstrip()}\n\n{case.fields['subject']}"


def related_prompt(case: EditCase) -> str:
    entity = case.fields["related"][0]
    prompt = entity.get("coupled_prompt") or f"Write a short passage about {entity['entity']}."
    return f"{prompt.rstrip()}\n\n{entity['entity']}"


def recall(passage: str, facts: Sequence[str]):
    facts = [f for f in facts if f.strip()]
    return sum(matches(passage, [f]) for f in facts) / len(facts) if facts else None


def reference(scorer, cases: Sequence[EditCase], options: EvalOptions) -> List[Any]:
    return [None] * len(cases)


def evaluate(scorer, cases: Sequence[EditCase], reference_data: Sequence[Any], options: EvalOptions) -> Dict[str, Any]:
    subject_texts = scorer.generate([subject_prompt(c) for c in cases], options.generation_tokens)
    related_texts = scorer.generate([related_prompt(c) for c in cases], options.generation_tokens)
    result: Dict[str, Any] = {
        "edit_mention": percent([matches(t, [c.fields["target_new"]]) for c, t in zip(cases, subject_texts)]),
        "old_mention": percent([matches(t, [c.fields["target_true"]]) for c, t in zip(cases, subject_texts)
                                if c.fields.get("target_true")]),
    }
    subject_recall = [recall(t, [f for f in c.fields["subject_facts"] if f != c.fields.get("target_true")])
                      for c, t in zip(cases, subject_texts)]
    related_recall = [recall(t, c.fields["related"][0]["facts"]) for c, t in zip(cases, related_texts)]
    result["subject_fact_recall"] = percent([v for v in subject_recall if v is not None])
    result["related_fact_recall"] = percent([v for v in related_recall if v is not None])
    result["fluency"] = fluency(subject_texts + related_texts)
    result["notes"] = ["LEME: lexical proxies of LEME's NLI/judge-based measures (see alphaedit_plugin/evaluation/leme.py)"]
    return result
