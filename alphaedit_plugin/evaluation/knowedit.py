"""KnowEdit metrics (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for LLMs").

The definitions are EasyEdit's: the probe-level functions of its evaluators
(``evaluate.compute_rewrite_or_rephrase_quality``, ``compute_locality_quality``,
``compute_portability_quality``, all on ``evaluate_utils.test_prediction_acc``; ``n_gram_entropy``
for Fluency) and the aggregation of EasyEdit's KnowEdit script (``examples/run_knowedit_llama2.py``,
``eval()``). They are reimplemented here on a scorer (:mod:`.scoring`: batched, any device, no host
needed); :func:`host_reference` / :func:`host_evaluate` call the host's own functions instead where
``easyeditor`` is importable (``alphaedit-bench --host-evaluators``), :func:`host_edit_arguments` gives
``BaseEditor.edit`` the KnowEdit script's inputs and :func:`host_case_figures` aggregates what it returns.
``tests/test_knowedit_host_parity.py`` checks ours against the host's functions probe by probe and case
by case on tiny GPT-2 and Llama models, and against ``BaseEditor.edit(sequential_edit=True)`` with the
plugin's AlphaEdit on SmolLM2 (KnowEdit ZsRE): there Edit Succ., Generalization and Locality are equal
and Portability at least the host's, case by case. In detail:

- Edit Succ.: teacher-forced top-1 token accuracy of ``target_new`` after ``prompt``
  (EasyEdit's ``rewrite_acc``, ``token_em``). For WikiBio the prompt is ``text`` and the
  target the sentence in ``labels``.
- Generalization: the same on ``rephrase_prompt`` where the file has one (KnowEdit ZsRE; the
  KnowEdit script does not report it).
- Portability: token accuracy of the portability ground truth after each portability prompt
  (Reasoning, Subject_Aliasing, Logical_Generalization), after editing. A ground truth may list
  aliases and, in wiki_recent, several answers each with aliases (``[["English", "en"], ["French"]]``):
  a probe scores the best accuracy over all listed aliases of all answers (any correct answer counts).
  **Differs from the host**: the KnowEdit script keeps only the first alias of the first answer
  (``while isinstance(an, list): an = an[0]``), so a probe here scores the maximum of the host's
  scores over the aliases: at least the host's figure, equal where a probe lists one alias (or the
  first scores best).
- Locality: share of answer positions whose top-1 prediction after editing equals the
  prediction before editing, on each locality prompt followed by its first listed answer
  (the host compares pre- and post-edit ``*_output`` token lists with ``np.mean(np.equal(...))``
  in ``BaseEditor.edit``; the same first alias as the script).
- Fluency: n-gram entropy (:mod:`.fluency`) of text generated from the edit prompt, 100 × the mean
  over cases (the script's ``Fluency``).

Aggregation (the script's ``eval()``): per case, Edit Succ. is the probe's accuracy; Portability
and Locality are the mean over kinds of the mean over that kind's probes (a case with 2 Reasoning
probes and 1 Logical_Generalization probe weighs the two kinds equally, not the three probes).
The reported figure is 100 × the mean over the cases that have such probes (cases without
portability probes are left out of Portability). Per-kind figures are reported as
``portability/<kind>`` and ``locality/<kind>`` (100 × the mean over the cases with that kind).

Where the figures match the host's, and where they do not (checked in the parity tests):

- Same tokens: a probe's answer tokens here are those that follow the prompt when ``prompt + " " +
  answer`` is tokenised in one piece (``tracing.prompt_and_answer_ids``, split at the prompt's last
  character by the tokens' offsets), as the host takes the tokens after ``len(tok(prompt))`` of the
  joint text. This also holds for a legacy SentencePiece tokenizer (Llama 2's ``tokenizer.json``:
  normaliser ``Prepend("▁")`` + ``Replace(" ", "▁")``), which encodes ``" Paris"`` alone as
  ``["▁", "▁Paris"]`` but the joint text as ``[..., "▁Paris"]``.
- Same predictions: every probe is scored as if alone (right padding, absolute positions). The host
  scores the probes of one kind as one batch, left-padded (``BaseEditor`` sets
  ``padding_side="left"`` for GPT-2/Llama tokenizers) without ``position_ids``, so a padded row's
  positions are shifted by its pad count: the same predictions for rotary models (Llama; GPT-J too)
  up to float rounding, different ones for learned absolute positions (GPT-2). With right padding the host's slices
  are misaligned altogether.
- No truncation, as in the current EasyEdit source, which widens ``hparams.max_length`` to the
  longest prompt + answer of a batch. (The 2023 PyPI release truncated ``prompt + " " + answer`` to
  ``max_length`` tokens and scored only the answer tokens within them.)
- Fluency: the n-gram entropy formula is ROME's, as the host's (identical on the same word tokens);
  words are split by a regular expression, not ``nltk.word_tokenize`` (see :mod:`.fluency`:
  possessives, contractions, hyphenated words and numbers split differently). The host generates
  with its own top-5 sampler (``generate_fast``) up to ``max_out_len=100`` tokens *including* the
  prompt; here ``options.generation_tokens`` new tokens follow the prompt, so the texts are longer
  and the figures not comparable one to one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence

from .datasets import EditCase
from .fluency import fluency
from .scoring import EvalOptions, percent, token_accuracy, token_agreement

HEADLINE = ["edit_succ", "portability", "locality", "fluency"]
HOST_MAX_LENGTH = 40  # hparams.max_length the host truncates to (AlphaEditHyperParams' default)
HOST_GENERATION_LENGTH = 100  # test_generation_quality's max_out_len (prompt included)


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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _case_figures(scores: Dict[str, List[float]]) -> Dict[str, float]:
    """One case's figures from its probe scores ``{metric or metric/kind: [score]}`` (the script's ``eval()``):
    Portability and Locality average the per-kind means."""
    figures = {name: _mean(values) for name, values in scores.items()}
    for metric in ("portability", "locality"):
        kinds = [value for name, value in figures.items() if name.startswith(metric + "/")]
        if kinds:
            figures[metric] = _mean(kinds)
    return figures


def _summarise(per_case: Sequence[Dict[str, float]], n_cases: int) -> Dict[str, Any]:
    collected: Dict[str, List[float]] = {}
    for figures in per_case:
        for name, value in figures.items():
            collected.setdefault(name, []).append(value)
    result: Dict[str, Any] = {name: percent(collected.get(name, [])) for name in
                              ["edit_succ", "generalization", "portability", "locality"]}
    result.update({name: percent(values) for name, values in sorted(collected.items()) if "/" in name})
    notes = []
    for name in ("portability", "locality"):
        n = len(collected.get(name, []))
        if n < n_cases:
            notes.append(f"{name}: {n_cases - n} of {n_cases} cases have no {name} probes"
                         + (" (not applicable)" if n == 0 else ""))
    result["notes"] = notes
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

    per_case = []
    for case_items, before in zip(plan, reference_data):
        scores: Dict[str, List[float]] = {}
        locality_at = 0
        for metric, kind, indices in case_items:
            if metric == "locality":
                value = token_agreement(before[locality_at], predictions[indices[0]][0])
                locality_at += 1
            else:
                value = max(token_accuracy(*predictions[i]) for i in indices)
            scores.setdefault(metric if kind is None else f"{metric}/{kind}", []).append(value)
        per_case.append(_case_figures(scores))
    result = _summarise(per_case, len(cases))
    notes = result.pop("notes")
    result["fluency"] = None
    if options.fluency:
        texts = scorer.generate([c.fields["prompt"] for c in cases], options.generation_tokens, sample=True,
                                seed=options.seed)
        result["fluency"] = fluency([c.fields["prompt"] + t for c, t in zip(cases, texts)])
    else:
        notes.append("fluency: not computed (generation is off; pass --fluency)")
    result["notes"] = notes
    return result


# ---------------------------------------------------------------------------
# The same figures from the host's own evaluators (needs ``easyeditor``)
# ---------------------------------------------------------------------------
def host_inputs(case: EditCase, metric: str) -> Dict[str, tuple]:
    """``{kind: (prompts, answers)}`` as EasyEdit's KnowEdit script passes a case's portability or locality
    probes to the host: each kind as one list, each probe with the first alias of its first answer."""
    return {kind: ([p["prompt"] for p in probes], [p["answers"][0][0] for p in probes])
            for kind, probes in sorted(case.fields[metric].items()) if probes}


def host_edit_arguments(cases: Sequence[EditCase]) -> Dict[str, Any]:
    """The keyword arguments of ``BaseEditor.edit`` for ``cases``, as EasyEdit's KnowEdit script builds them: one
    entry per case; per probe kind a list per case (None where the case has no probe of that kind); each
    probe with the first alias of its first answer."""
    fields = [case.fields for case in cases]
    arguments: Dict[str, Any] = {
        "prompts": [f["prompt"] for f in fields],
        "target_new": [f["target_new"] for f in fields],
        "subject": [f["subject"] for f in fields],
        "ground_truth": [f["ground_truth"][0][0] if f["ground_truth"] else "<|endoftext|>" for f in fields],
    }
    if all(f.get("rephrase") for f in fields):
        arguments["rephrase_prompts"] = [f["rephrase"] for f in fields]
    for metric in ("locality", "portability"):
        per_case = [host_inputs(case, metric) for case in cases]
        kinds = sorted({kind for inputs in per_case for kind in inputs})
        if kinds:
            arguments[f"{metric}_inputs"] = {
                kind: {"prompt": [inputs[kind][0] if kind in inputs else None for inputs in per_case],
                       "ground_truth": [inputs[kind][1] if kind in inputs else None for inputs in per_case]}
                for kind in kinds}
    return arguments


def host_case_figures(metrics: Dict[str, Any]) -> Dict[str, float]:
    """One case's figures (fractions) from the metrics ``BaseEditor.edit`` returns for it, aggregated as
    :func:`evaluate` does: Edit Succ. (``rewrite_acc``), Generalization (``rephrase_acc``), Portability and
    Locality as the mean over kinds of the mean over the kind's probes (``<kind>_acc``)."""
    import numpy as np

    post = metrics["post"]
    scores: Dict[str, List[float]] = {"edit_succ": [float(np.mean(post["rewrite_acc"]))]}
    if "rephrase_acc" in post:
        scores["generalization"] = [float(np.mean(post["rephrase_acc"]))]
    for metric in ("portability", "locality"):
        for key, values in sorted((post.get(metric) or {}).items()):
            if key.endswith("_acc"):
                scores[f"{metric}/{key[:-len('_acc')]}"] = [float(np.mean(v)) for v in values]
    return _case_figures(scores)


def _host_device(model):
    device = next(model.parameters()).device
    if device.type == "cuda":
        return device.index or 0  # the host builds f"cuda:{device}"
    return device.type  # "cuda:cpu": read as "cpu" under cuda_prefix_aliases


@contextmanager
def _host_call(tok):
    """CPU-safe device strings and the host's left padding (``BaseEditor`` sets it for GPT-2/Llama tokenizers)."""
    from ..hosts.easyedit.compat import cuda_prefix_aliases

    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with cuda_prefix_aliases():
            yield
    finally:
        tok.padding_side = side


def _host_args(model, max_length: int):
    from types import SimpleNamespace

    # The host reads hparams.max_length and alg_name here (the current source switches GRACE to generation),
    # and the model name only to detect T5.
    hparams = SimpleNamespace(max_length=max_length, alg_name="AlphaEdit")
    return getattr(model.config, "model_type", "causal-lm"), hparams, _host_device(model)


def host_reference(model, tok, cases: Sequence[EditCase], max_length: int = HOST_MAX_LENGTH) -> List[Dict[str, list]]:
    """The host's pre-edit locality outputs per case: ``{kind: [token ids per probe]}``
    (``compute_locality_quality``, as ``BaseEditor.edit`` computes its ``pre`` metrics)."""
    from easyeditor.evaluate.evaluate import compute_locality_quality

    name, hparams, device = _host_args(model, max_length)
    result = []
    with _host_call(tok):
        for case in cases:
            result.append({kind: compute_locality_quality(model, name, hparams, tok, kind, prompts, answers,
                                                          device=device)[f"{kind}_output"]
                           for kind, (prompts, answers) in host_inputs(case, "locality").items()})
    return result


def host_fluency_unavailable() -> Optional[str]:
    """Why the host's Fluency cannot be scored here, or None where it can.

    The host's ``n_gram_entropy`` splits text with ``nltk.word_tokenize``, which loads NLTK's ``punkt_tab``
    sentence data. That data is not on the package registries (``nltk.download`` fetches it from GitHub), so an
    offline machine has it only where someone put it there.
    """
    try:
        import nltk
    except ImportError:
        return "nltk is not installed (pip install nltk)"
    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle"):
        try:
            nltk.data.find(resource)
            return None
        except LookupError:
            continue
    return ("NLTK's punkt_tab data, which EasyEdit's n_gram_entropy needs, is not installed (python -m "
            "nltk.downloader punkt_tab, where a network allows)")


def host_evaluate(model, tok, cases: Sequence[EditCase], reference_data: Sequence[Dict[str, list]],
                  max_length: int = HOST_MAX_LENGTH, fluency: bool = False, seed: int = 0,
                  generation_length: int = HOST_GENERATION_LENGTH) -> Dict[str, Any]:
    """KnowEdit figures computed by the host's own evaluators (``easyeditor`` must be importable).

    Each case goes through ``compute_rewrite_or_rephrase_quality`` (Edit Succ., Generalization),
    ``compute_portability_quality`` and ``compute_locality_quality`` with the inputs of EasyEdit's
    KnowEdit script (:func:`host_inputs`), locality against ``reference_data`` from
    :func:`host_reference`, and, with ``fluency``, ``test_generation_quality`` (needs nltk's
    ``punkt_tab`` data; ``generation_length`` tokens, prompt included, sampled with ``torch.manual_seed(seed + i)``
    for the i-th case). The host's quirks are kept (see the module docstring): first alias only,
    left-padded batches per kind, truncation to ``max_length`` tokens. Figures are aggregated as
    :func:`evaluate` does (the script's ``eval()``); ``cases`` holds each case's figures (fractions).
    """
    import numpy as np
    import torch
    from easyeditor.evaluate.evaluate import compute_locality_quality, compute_rewrite_or_rephrase_quality
    from easyeditor.evaluate.evaluate_utils import test_generation_quality
    try:  # the current source has it beside the others; the 2023 PyPI release in its own module
        from easyeditor.evaluate.evaluate import compute_portability_quality
    except ImportError:
        from easyeditor.evaluate.portability_evaluate import compute_portability_quality

    if len(reference_data) != len(cases):
        raise ValueError(f"locality reference holds {len(reference_data)} cases, evaluation {len(cases)}")
    name, hparams, device = _host_args(model, max_length)
    per_case, entropies = [], []
    with _host_call(tok):
        for case, before in zip(cases, reference_data):
            f = case.fields
            scores: Dict[str, List[float]] = {}
            rewrite = compute_rewrite_or_rephrase_quality(model, name, hparams, tok, f["prompt"], f["target_new"],
                                                          device=device)
            scores["edit_succ"] = [float(rewrite["rewrite_acc"][0])]
            if f.get("rephrase"):
                rephrase = compute_rewrite_or_rephrase_quality(model, name, hparams, tok, f["rephrase"],
                                                               f["target_new"], device=device, test_rephrase=True)
                scores["generalization"] = [float(rephrase["rephrase_acc"][0])]
            for kind, (prompts, answers) in host_inputs(case, "portability").items():
                accuracy = compute_portability_quality(model, name, hparams, tok, kind, prompts, answers,
                                                       device=device)[f"{kind}_acc"]
                scores[f"portability/{kind}"] = [float(a) for a in accuracy]
            for kind, (prompts, answers) in host_inputs(case, "locality").items():
                after = compute_locality_quality(model, name, hparams, tok, kind, prompts, answers,
                                                 device=device)[f"{kind}_output"]
                if len(after) != len(before[kind]):
                    raise ValueError(f"locality reference of case {case.case_id} holds {len(before[kind])} "
                                     f"{kind} probes, evaluation {len(after)}")
                scores[f"locality/{kind}"] = [float(np.mean(np.equal(a, b))) for a, b in zip(after, before[kind])]
            per_case.append(_case_figures(scores))
            if fluency:
                torch.manual_seed(seed + len(entropies))
                entropies.append(test_generation_quality(model=model, tok=tok, prefixes=[f["prompt"]],
                                                         max_out_len=generation_length)["ngram_entropy"])
    result = _summarise(per_case, len(cases))
    result["fluency"] = percent(entropies) if fluency else None
    result["cases"] = per_case
    return result
