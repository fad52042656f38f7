"""MQuAKE metrics (Zhong et al. 2023, "MQuAKE: Assessing Knowledge Editing via Multi-Hop Questions").

All rewrites of a case (``requested_rewrite``, two to four single-hop facts)
are edited; the case is then asked its multi-hop ``questions`` (three
phrasings of one chain).

- Multi-hop accuracy: a case counts as correct if, for at least one of its questions, the
  model's answer matches the new answer or one of its aliases (MQuAKE's rule). The answer is
  the greedy continuation of ``"Q: <question>\\nA:"`` up to its first line break; it matches
  when an alias occurs in it as whole words, ignoring case.
- Multi-hop accuracy, chain of thought: the same questions after a worked two-hop example in
  MQuAKE's "Question / Thoughts / Answer" style; the answer is read after the first
  ``Answer:`` the model writes. ``cot_format_followed`` is the share of generations that
  wrote an ``Answer:`` line at all: a small model that cannot follow the format scores low
  for that reason, and this figure says so.
- New single-hop accuracy: the same matching on each hop of the new chain
  (``new_single_hops``, cloze prompts), which says whether the individual edits took.
- ``old_answer_rate``: share of cases whose answer still names the original answer.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence

from .datasets import EditCase
from .scoring import EvalOptions, percent

HEADLINE = ["multihop_accuracy", "multihop_cot_accuracy", "new_single_hop_accuracy"]

COT_DEMO = (
    "Question: What is the capital of the country where the Eiffel Tower is located?\n"
    "Thoughts: The Eiffel Tower is located in France. The capital of France is Paris.\n"
    "Answer: Paris\n\n"
)


def qa_prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def cot_prompt(question: str) -> str:
    return f"{COT_DEMO}Question: {question}\nThoughts:"


def first_line(text: str) -> str:
    text = text.strip()
    return text.split("\n", 1)[0] if text else ""


def cot_answer(text: str):
    """The text after the first ``Answer:`` up to the line break, or None when there is none."""
    match = re.search(r"Answer:\s*([^\n]*)", text)
    return match.group(1) if match else None


def matches(answer: str, aliases: Sequence[str]) -> bool:
    """Whether any alias occurs in the answer as whole words (case ignored)."""
    low = answer.lower()
    for alias in aliases:
        alias = alias.strip().lower()
        if alias and re.search(r"(?<!\w)" + re.escape(alias) + r"(?!\w)", low):
            return True
    return False


def reference(scorer, cases: Sequence[EditCase], options: EvalOptions) -> List[Any]:
    return [None] * len(cases)


def evaluate(scorer, cases: Sequence[EditCase], reference_data: Sequence[Any], options: EvalOptions) -> Dict[str, Any]:
    questions = [(i, q) for i, case in enumerate(cases) for q in case.fields["questions"]]
    answers = [first_line(t) for t in scorer.generate([qa_prompt(q) for _, q in questions], options.answer_tokens)]
    hit = [False] * len(cases)
    old = [False] * len(cases)
    for (i, _), answer in zip(questions, answers):
        hit[i] = hit[i] or matches(answer, cases[i].fields["new_answers"])
        old[i] = old[i] or matches(answer, cases[i].fields["old_answers"])
    result: Dict[str, Any] = {"multihop_accuracy": percent(hit), "old_answer_rate": percent(old)}

    hops = [(case, hop) for case in cases for hop in case.fields["new_single_hops"] if hop.get("cloze")]
    hop_answers = scorer.generate([hop["cloze"] for _, hop in hops], options.answer_tokens) if hops else []
    result["new_single_hop_accuracy"] = percent([matches(first_line(a), hop["answers"])
                                                 for (_, hop), a in zip(hops, hop_answers)])
    notes = []
    if not hops:
        notes.append("new_single_hop_accuracy: the file has no new_single_hops with cloze prompts")
    result["multihop_cot_accuracy"] = result["cot_format_followed"] = None
    if options.cot:
        texts = scorer.generate([cot_prompt(q) for _, q in questions], options.cot_tokens)
        cot_hit = [False] * len(cases)
        followed = []
        for (i, _), text in zip(questions, texts):
            answer = cot_answer(text)
            followed.append(answer is not None)
            cot_hit[i] = cot_hit[i] or (answer is not None and matches(answer, cases[i].fields["new_answers"]))
        result["multihop_cot_accuracy"] = percent(cot_hit)
        result["cot_format_followed"] = percent(followed)
        if result["cot_format_followed"] is not None and result["cot_format_followed"] < 50:
            notes.append(f"multihop_cot_accuracy: the model wrote an 'Answer:' line in only "
                         f"{result['cot_format_followed']:.0f}% of generations; it does not follow the "
                         "chain-of-thought format well, so this figure understates what it knows")
    result["notes"] = notes
    return result
