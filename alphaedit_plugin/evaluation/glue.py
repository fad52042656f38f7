"""General capability before and after editing (AlphaEdit RQ2, Fig. 4): SST-2, MRPC, CoLA, RTE, MMLU, NLI.

Reads the JSON subsets in ``../shared/data/glue/`` (converted from AlphaEdit's
``glue_eval/dataset/*.pkl``; see that folder's README) and scores them as
AlphaEdit's ``glue_eval`` does, zero-shot, on records ``start .. start+n-1``
(the repository scores records 10-109: the first ten are its few-shot pool).

Prompts and candidate answers follow the repository (summarised in the data README):

======  ==============================================================  ======================
task    prompt                                                          candidates → class
======  ==============================================================  ======================
sst2    ``Review :<s>\\nSentiment :``                                    positive→1, negative→0
mrpc    ``Are the sentences paraphrases of each other.\\nSentence 1: …``  Yes→1 (equivalent), No→0
cola    ``Is this sentence linguistically acceptable?\\nSentence: …``     Yes→1 (acceptable), No→0
rte     ``<premise>\\nquestion: <hypothesis> True or False?\\nanswer:``   see below
nli     ``<premise> entails the <hypothesis> True or False? Answer:``   True→entailment, False→not
mmlu    ``Question: <q>\\n(A) …\\n(D) …\\nAnswer:``                        A..D → 0..3
======  ==============================================================  ======================

Label codings differ between files: rte.json uses GLUE's (0 = entailment,
1 = not_entailment), nli.json the reverse (1 = entailment). Gold classes are
checked against ``label_text`` so that a mix-up raises an error. The
repository's RTE prompt counts "True" as correct for *not_entailment*
(an inverted target); ``rte_mapping="glue"`` (the default) scores
True ⇔ entailment, ``rte_mapping="repo"`` reproduces the repository.

Two scores per task, as in the repository:

- likelihood (``f1_new``, ``accuracy_new``): each candidate word's per-token geometric-mean
  probability after the prompt, exp(-mean NLL); a binary task predicts the first-listed
  candidate iff it is strictly more probable; MMLU needs a strict maximum, else the prediction
  is invalid (-1);
- generation (``f1``, ``mcc``, ``correct``/``incorrect``/``invalid``, ``accuracy``): greedy
  decoding of 5 tokens, parsed by substring tests in the repository's order; no match is invalid.

F1 is scikit-learn's ``f1_score(average="weighted")`` and MCC its multi-class
``matthews_corrcoef``, reimplemented without scikit-learn; invalid predictions
stay in as an extra class with no support.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from .datasets import DatasetError

TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")
GEN_TOKENS = 5


@dataclass
class Item:
    prompt: str
    gold: int


@dataclass
class Task:
    name: str
    candidates: List[Tuple[str, int]]  # (word with leading space, class); the first-listed wins ties' opposite
    parse: Callable[[str], int]  # generated continuation -> class or -1
    items: List[Item]
    multiclass: bool = False


# ---------------------------------------------------------------------------
# Scores (pure)
# ---------------------------------------------------------------------------

def weighted_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """scikit-learn ``f1_score(gold, predicted, average="weighted")`` (zero_division=0)."""
    labels = sorted(set(gold) | set(predicted))
    total = len(gold)
    score = 0.0
    for label in labels:
        tp = sum(1 for g, p in zip(gold, predicted) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, predicted) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, predicted) if g == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        score += f1 * (tp + fn) / total
    return score


def matthews(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """scikit-learn ``matthews_corrcoef`` (multi-class form; 0 when undefined)."""
    labels = sorted(set(gold) | set(predicted))
    s = len(gold)
    c = sum(1 for g, p in zip(gold, predicted) if g == p)
    t = {k: sum(1 for g in gold if g == k) for k in labels}
    p = {k: sum(1 for q in predicted if q == k) for k in labels}
    numerator = c * s - sum(t[k] * p[k] for k in labels)
    denominator = math.sqrt((s * s - sum(v * v for v in p.values())) * (s * s - sum(v * v for v in t.values())))
    return numerator / denominator if denominator else 0.0


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------

def _first_match(order: Sequence[Tuple[str, int]]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        low = text.lower()
        for word, label in order:
            if word in low:
                return label
        return -1
    return parse


def _parse_letter(text: str) -> int:
    low = text.lower()
    for i, letter in enumerate("abcd"):
        if letter + "\n" in low:
            return i
    return -1


def _load(path: Path, fields: Sequence[str]) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file; pass --glue-dir pointing at the folder with the GLUE JSON files")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    data = json.loads(text)
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty JSON list of records")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: record {i}: expected an object")
        for name in fields:
            if name not in record:
                raise DatasetError(f"{path}: record {i}, field {name!r}: missing")
    return data


def _gold(path: Path, i: int, record: Dict[str, Any], coding: Dict[str, int]) -> int:
    label = record["label"]
    text = record.get("label_text")
    if text is not None:
        if text not in coding:
            raise DatasetError(f"{path}: record {i}, field 'label_text': {text!r} is not one of {sorted(coding)}")
        if coding[text] != label:
            raise DatasetError(f"{path}: record {i}, field 'label': {label!r} disagrees with label_text {text!r} "
                               f"under this file's coding {coding}")
    if label not in coding.values():
        raise DatasetError(f"{path}: record {i}, field 'label': {label!r} is not one of {sorted(coding.values())}")
    return int(label)


def load_task(glue_dir, name: str, n: int = 100, start: int = 10, rte_mapping: str = "glue") -> Task:
    """One task's prompts, candidates and gold classes (records ``start .. start+n-1``)."""
    if name not in TASKS:
        raise ValueError(f"unknown general-capability task {name!r}; known: {', '.join(TASKS)}")
    if rte_mapping not in ("glue", "repo"):
        raise ValueError(f"rte_mapping must be 'glue' or 'repo', got {rte_mapping!r}")
    path = Path(glue_dir).expanduser() / f"{name}.json"
    pair = ("sentence1", "sentence2", "label")
    fields = {"sst2": ("sentence", "label"), "cola": ("sentence", "label"), "mrpc": pair, "rte": pair, "nli": pair,
              "mmlu": ("question", "choices", "answer")}[name]
    data = _load(path, fields)
    if start + n > len(data):
        raise DatasetError(f"{path}: records {start}..{start + n - 1} requested but the file has {len(data)}")
    items: List[Item] = []
    for i in range(start, start + n):
        r = data[i]
        if name == "sst2":
            items.append(Item(f"Review :{r['sentence']}\nSentiment :", _gold(path, i, r, {"negative": 0, "positive": 1})))
        elif name == "cola":
            items.append(Item(f"Is this sentence linguistically acceptable?\nSentence: {r['sentence']}\nAnswer: ",
                              _gold(path, i, r, {"unacceptable": 0, "acceptable": 1})))
        elif name == "mrpc":
            items.append(Item(f"Are the sentences paraphrases of each other.\nSentence 1: {r['sentence1']}\n"
                              f"Sentence 2: {r['sentence2']}\nAnswer:",
                              _gold(path, i, r, {"not_equivalent": 0, "equivalent": 1})))
        elif name == "rte":
            items.append(Item(f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\nanswer:",
                              _gold(path, i, r, {"entailment": 0, "not_entailment": 1})))
        elif name == "nli":
            items.append(Item(f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer:",
                              _gold(path, i, r, {"not_entailment": 0, "entailment": 1})))
        else:
            choices = r["choices"]
            if not isinstance(choices, list) or len(choices) != 4:
                raise DatasetError(f"{path}: record {i}, field 'choices': expected 4 strings")
            if r["answer"] not in (0, 1, 2, 3):
                raise DatasetError(f"{path}: record {i}, field 'answer': {r['answer']!r} is not 0..3")
            lines = "\n".join(f"({letter}) {c}" for letter, c in zip("ABCD", choices))
            items.append(Item(f"Question: {r['question']}\n{lines}\nAnswer:", int(r["answer"])))
    if name == "sst2":
        return Task(name, [(" positive", 1), (" negative", 0)], _first_match([("positive", 1), ("negative", 0)]), items)
    if name in ("cola", "mrpc"):
        return Task(name, [(" Yes", 1), (" No", 0)], _first_match([("yes", 1), ("no", 0)]), items)
    if name == "rte":
        true_class = 1 if rte_mapping == "repo" else 0  # repo: True -> label 1 (not_entailment, inverted)
        return Task(name, [(" True", true_class), (" False", 1 - true_class)],
                    _first_match([("false", 1 - true_class), ("true", true_class)]), items)
    if name == "nli":
        return Task(name, [(" True", 1), (" False", 0)], _first_match([("false", 0), ("true", 1)]), items)
    return Task(name, [(" A", 0), (" B", 1), (" C", 2), (" D", 3)], _parse_letter, items, multiclass=True)


def likelihood_predictions(scorer, task: Task) -> List[int]:
    pairs = [(item.prompt, word) for item in task.items for word, _ in task.candidates]
    nll = scorer.nll(pairs)
    k = len(task.candidates)
    predictions = []
    for i in range(len(task.items)):
        values = nll[i * k:(i + 1) * k]
        if task.multiclass:
            best = min(values)
            winners = [j for j, v in enumerate(values) if v == best]
            predictions.append(task.candidates[winners[0]][1] if len(winners) == 1 else -1)
        else:  # the first-listed candidate wins only if strictly more probable
            predictions.append(task.candidates[0][1] if values[0] < values[1] else task.candidates[1][1])
    return predictions


def score_task(scorer, task: Task, generation: bool = True) -> Dict[str, Any]:
    gold = [item.gold for item in task.items]
    lik = likelihood_predictions(scorer, task)
    result: Dict[str, Any] = {"n": len(gold), "f1_new": weighted_f1(gold, lik),
                              "accuracy_new": sum(g == p for g, p in zip(gold, lik)) / len(gold)}
    if generation:
        texts = scorer.generate([item.prompt for item in task.items], GEN_TOKENS)
        gen = [task.parse(t) for t in texts]
        correct = sum(g == p for g, p in zip(gold, gen))
        invalid = sum(p == -1 for p in gen)
        result.update({"correct": correct, "incorrect": len(gold) - correct - invalid, "invalid": invalid,
                       "accuracy": correct / len(gold), "f1": weighted_f1(gold, gen), "mcc": matthews(gold, gen)})
    return result


def evaluate_general(scorer, glue_dir, tasks: Sequence[str] = TASKS, n: int = 100, start: int = 10,
                     generation: bool = True, rte_mapping: str = "glue") -> Dict[str, Dict[str, Any]]:
    """Scores per task: ``{task: {f1_new, accuracy_new, f1, mcc, accuracy, correct, incorrect, invalid, n}}``."""
    return {name: score_task(scorer, load_task(glue_dir, name, n, start, rte_mapping), generation) for name in tasks}
