"""CounterFact metrics (AlphaEdit Eqs. 19-22; ROME's ``compute_rewrite_quality_counterfact``).

With s the subject, r the relation, o the true and o* the new object, and a
"probability comparison" P(a | p) > P(b | p) decided on the mean per-token
negative log-likelihood of the answer after the prompt (lower NLL wins; ROME
``test_batch_prediction``):

- Efficacy (Eq. 19): E_i[ P(o*_i | p(s_i, r_i)) > P(o_i | p(s_i, r_i)) ] on the edit prompt.
- Generalization (Eq. 20): the same, averaged over the paraphrase prompts N(s_i, r_i) of each case.
- Specificity (Eq. 21): E_i[ P(o_c | p) > P(o*_i | p) ] over the neighbourhood prompts O(s_i, r_i)
  (other subjects, same relation, whose true answer o_c must keep winning): the sign is the
  paper's, so higher is better. In ROME-format files o_c is the case's target_true; in the flat
  EasyEdit file it is ``locality_ground_truth``.
- Fluency (Eq. 22): n-gram entropy of text generated from ``generation_prompts``
  (see :mod:`.fluency`); the flat file has none, so its generations start from the edit prompt.
- Consistency: TF-IDF similarity of the generations to reference text about o* (ROME's
  reference score); only where reference texts are given (``EvalOptions.snippets``).

Each figure is 100 × the mean over cases of the per-case mean, as ROME's summariser reports it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .datasets import EditCase, parse_records
from .fluency import fit_idf, fluency, tfidf_similarity
from .scoring import EvalOptions, ModelScorer, percent

HEADLINE = ["efficacy", "generalization", "specificity", "fluency", "consistency"]


def reference(scorer, cases: Sequence[EditCase], options: EvalOptions) -> List[Any]:
    """CounterFact needs nothing from the unedited model."""
    return [None] * len(cases)


def comparisons(scorer, cases: Sequence[EditCase]) -> Dict[str, List[float]]:
    """Per-case Efficacy, Generalization and Specificity (each in [0, 1])."""
    pairs, layout = [], []
    for case in cases:
        f = case.fields
        layout.append((len(f["paraphrases"]), len(f["neighbourhood"])))
        pairs += [(f["prompt"], f["target_new"]), (f["prompt"], f["target_true"])]
        for p in f["paraphrases"]:
            pairs += [(p, f["target_new"]), (p, f["target_true"])]
        for p, truth in f["neighbourhood"]:
            pairs += [(p, f["target_new"]), (p, truth)]
    nll = scorer.nll(pairs)
    result = {"efficacy": [], "generalization": [], "specificity": []}
    at = 0
    for n_para, n_neigh in layout:
        new, true = nll[at], nll[at + 1]
        at += 2
        result["efficacy"].append(float(new < true))
        wins = []
        for _ in range(n_para):
            wins.append(float(nll[at] < nll[at + 1]))
            at += 2
        if wins:
            result["generalization"].append(sum(wins) / len(wins))
        keeps = []
        for _ in range(n_neigh):
            keeps.append(float(nll[at + 1] < nll[at]))
            at += 2
        if keeps:
            result["specificity"].append(sum(keeps) / len(keeps))
    return result


def counterfact_scores(model, tok, records: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Efficacy, Generalization and Specificity (percent) of ``model`` on flat EasyEdit CounterFact records
    (``prompt, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``)."""
    per_case = comparisons(ModelScorer(model, tok), parse_records(records, "counterfact_flat"))
    return {name: percent(values) for name, values in per_case.items()}


def generation_prompts(case: EditCase, count: int) -> List[str]:
    prompts = list(dict.fromkeys(case.fields.get("generation_prompts") or []))  # unique, in order
    return (prompts or [case.fields["prompt"]])[:max(1, count)]


def load_snippets(path) -> Dict[tuple, List[str]]:
    """ROME's ``attribute_snippets.json`` (a list of {relation_id, target_id, samples: [{text}]})."""
    import json

    data = json.loads(open(path, encoding="utf-8").read())
    table: Dict[tuple, List[str]] = {}
    for i, item in enumerate(data):
        try:
            key = (item["relation_id"], item["target_id"])
            table.setdefault(key, []).extend(s["text"] for s in item["samples"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: record {i}: expected relation_id, target_id and samples[{{text}}] "
                             f"(ROME attribute_snippets.json): missing {error}") from None
    return table


def evaluate(scorer, cases: Sequence[EditCase], reference_data: Sequence[Any], options: EvalOptions) -> Dict[str, Any]:
    per_case = comparisons(scorer, cases)
    result: Dict[str, Any] = {name: percent(values) for name, values in per_case.items()}
    notes = []
    result["fluency"] = result["consistency"] = None
    if options.fluency:
        prompts_per_case = [generation_prompts(case, options.fluency_prompts) for case in cases]
        flat = [prompt for prompts in prompts_per_case for prompt in prompts]  # one batched call for all cases
        continuations = iter(scorer.generate(flat, options.generation_tokens, sample=True, seed=options.seed))
        texts_per_case = [[p + next(continuations) for p in prompts] for prompts in prompts_per_case]
        result["fluency"] = percent([fluency(texts) / 100 for texts in texts_per_case])
        if not any(case.fields.get("generation_prompts") for case in cases):
            notes.append("fluency: the file has no generation_prompts; generations start from the edit prompt")
        if options.snippets:
            scores = []
            for case, texts in zip(cases, texts_per_case):
                refs = options.snippets.get((case.fields.get("relation_id"), case.fields.get("target_new_id")))
                if refs:
                    idf = fit_idf(list(refs) + texts)
                    scores.append(tfidf_similarity(" ".join(texts), " ".join(refs), idf))
            result["consistency"] = percent(scores)
            notes.append(f"consistency: TF-IDF similarity to the given reference texts on {len(scores)} of "
                         f"{len(cases)} cases (IDF fitted on those texts, not ROME's Wikipedia IDF)")
        else:
            notes.append("consistency: not computed: no reference text (ROME's attribute_snippets.json) was given; "
                         "the CounterFact files here do not contain any")
    else:
        notes.append("fluency and consistency: not computed (generation is off; pass --fluency)")
    result["notes"] = notes
    return result
