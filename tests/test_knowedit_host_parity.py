"""KnowEdit metrics (``alphaedit_plugin.evaluation.knowedit``) against the EasyEdit host's own evaluators.

The host's functions (``compute_rewrite_or_rephrase_quality``, ``compute_portability_quality``,
``compute_locality_quality``, ``test_prediction_acc``, ``compute_n_gram_entropy``) are called directly,
on CPU inside :func:`alphaedit_plugin.hosts.easyedit.compat.cuda_prefix_aliases` (they build ``cuda:{device}``
strings), on tiny random GPT-2 and Llama models, and compared with our figures (through
:class:`ModelScorer`) probe by probe and case by case. Where the two legitimately differ, the test checks
the relation the docstring of ``knowedit.py`` states: any alias vs. the host's first alias, the host's
left-padded batches, legacy SentencePiece answer tokens, and
word tokens for Fluency.

The tokenizer is conftest's word-level one with two settings of the real GPT-2/Llama tokenizers: no
``token_type_ids`` among its outputs (the host passes every output to the model, and GPT-2 would add
``wte(token_type_ids)`` to its inputs) and left padding (``BaseEditor`` sets it for GPT-2/Llama tokenizers).
"""

from __future__ import annotations

import copy
import json
import types
import warnings

import numpy as np
import pytest
from conftest import require_host
import torch

easyeditor = require_host()

from pathlib import Path  # noqa: E402

from conftest import BUILDERS, VOCAB, make_tokenizer  # noqa: E402
from easyeditor.evaluate import evaluate_utils as host_utils  # noqa: E402
from easyeditor.evaluate.evaluate import (compute_locality_quality, compute_portability_quality,  # noqa: E402
                                          compute_rewrite_or_rephrase_quality)

from alphaedit_plugin.hosts.easyedit.compat import cuda_prefix_aliases  # noqa: E402
from alphaedit_plugin.evaluation import EvalOptions, ModelScorer, knowedit, load_dataset  # noqa: E402
from alphaedit_plugin.evaluation.fluency import fluency, ngram_entropy, words  # noqa: E402
from alphaedit_plugin.evaluation.scoring import token_accuracy  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# The host reads alg_name and max_length off the hparams (truncation has its own test).
NO_TRUNCATION = types.SimpleNamespace(max_length=1000, alg_name="AlphaEdit")
OPTIONS = EvalOptions()
SPECIAL_IDS = (0, 1, 2)  # <unk>, <pad>, <eos>


def host_tokenizer():
    tok = make_tokenizer()
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.padding_side = "left"
    return tok


def host_answer_ids(tok, prompt: str, answer: str):
    """The answer tokens of the host's ``test_prediction_acc``: ``prompt + " " + answer`` tokenised in one piece,
    after the ``len(tok(prompt))`` prompt tokens."""
    return tok(prompt + " " + answer)["input_ids"][len(tok(prompt)["input_ids"]):]


@torch.no_grad()
def greedy_words(model, tok, prompt: str, n: int):
    """The model's teacher-forced top-1 continuation, or None where it holds a special token."""
    ids, out = tok(prompt)["input_ids"], []
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        out.append(ids[-1])
    return None if set(out) & set(SPECIAL_IDS) else tok.convert_ids_to_tokens(out)


def other_word(word: str) -> str:
    return "Tesla" if word != "Tesla" else "Apple"


CANDIDATES = ["The capital of France is", "The company Toyota was made in", "The mountain of Japan is the famous",
              "France speaks", "Einstein was a", "The language of France is", "The river in France is",
              "The capital of Paris is", "The river in Japan is", "Japan", "The famous scientist Newton was born in",
              "Apple is a company in", "The city of Rome is the", "Curie was a famous", "The Nile is a river in",
              "Obama speaks", "The Amazon river is in", "Berlin is the capital of", "Madrid is a city in",
              "The mother tongue of Obama is"]


def subject(prompt: str) -> str:
    return max(prompt.split(), key=len)


def synthetic_records(model, tok):
    """KnowEdit-schema records in the tiny vocabulary, with answers the edited model partly predicts (its own
    top-1 continuations, some altered), so that accuracies are neither all 0 nor all 1; kinds with several probes
    of different lengths; aliases."""
    pool = iter(CANDIDATES)

    def predicted(n):  # the next candidate prompt whose top-1 continuation is n ordinary words
        for prompt in pool:
            continuation = greedy_words(model, tok, prompt, n)
            if continuation:
                return prompt, continuation
        raise AssertionError("too few candidate prompts with ordinary-word continuations")

    edit, edit_words = predicted(2)
    lg, lg_words = predicted(1)
    sa, sa_words = predicted(2)
    reasoning_1, reasoning_1_words = predicted(1)
    toyota, toyota_words = predicted(2)
    reasoning = [predicted(k) for k in (1, 3, 2)]
    return [
        {"subject": subject(edit), "prompt": edit, "target_new": " ".join(edit_words),  # Edit Succ. 1
         "rephrase_prompt": "France capital is the", "ground_truth": ["Paris"],
         "portability": {
             "Reasoning": [{"prompt": reasoning_1, "ground_truth": reasoning_1_words[0]},
                           {"prompt": "The mountain of France is the", "ground_truth": "Nile Amazon Everest"}],
             # the first alias is wrong, the second right: the host (first alias) and we (any alias) differ
             "Logical_Generalization": [{"prompt": lg, "ground_truth": [[other_word(lg_words[0]), lg_words[0]]]}],
             # first token right, second wrong: 0.5
             "Subject_Aliasing": [{"prompt": sa, "ground_truth": [sa_words[0] + " " + other_word(sa_words[1])]}],
         },
         "locality": {
             "Relation_Specificity": [{"prompt": "Einstein was born in", "ground_truth": ["Germany"]},
                                      {"prompt": "The mother tongue of Curie is the",
                                       "ground_truth": [["French language of France", "French"]]}],
             "Forgetfulness": [{"prompt": "Newton was a famous", "ground_truth": "scientist and"}],
         }},
        {"subject": subject(toyota), "prompt": toyota,
         "target_new": toyota_words[0] + " " + other_word(toyota_words[1]),
         "portability": {"Reasoning": [{"prompt": p, "ground_truth": " ".join(w)} for p, w in reasoning]},
         "locality": {"Relation_Specificity": [{"prompt": "Obama was born in the", "ground_truth": "city of Japan"}]}},
        {"subject": "Nile", "prompt": "The river Nile is located in", "target_new": "Japan", "portability": {},
         "locality": {}},
    ]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def parity(request, tmp_path_factory):
    """(arch, tokenizer, unedited model, "edited" model, cases): the edit is a small perturbation of every weight,
    so that locality predictions partly change."""
    arch = request.param
    tok = host_tokenizer()
    pre = BUILDERS[arch]()
    post = copy.deepcopy(pre)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in post.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp(f"knowedit-{arch}") / "synthetic.json"
    path.write_text(json.dumps(synthetic_records(post, tok)))
    cases = load_dataset(path).cases
    for name in ("knowedit_zsre.json", "knowedit_recent.json"):
        cases += load_dataset(FIXTURES / name).cases
    cases += load_dataset(FIXTURES / "knowedit_wikibio.json").cases
    return arch, tok, pre, post, cases


def host_call(function, *args, **kwargs):
    with cuda_prefix_aliases():
        return function(*args, **kwargs)


def host_predictions(model, tok, prompt, answer, max_length=NO_TRUNCATION):
    """The host's top-1 tokens at the answer positions of one probe scored alone."""
    return host_call(host_utils.test_prediction_acc, model, tok, max_length, prompt, answer, "cpu", locality=True)[0]


def probes(case):
    """Every (prompt, answer) that our evaluation scores for a case."""
    f = case.fields
    pairs = [(f["prompt"], f["target_new"])] + ([(f["rephrase"], f["target_new"])] if f.get("rephrase") else [])
    for probe_list in f["portability"].values():
        pairs += [(p["prompt"], alias) for p in probe_list for answer in p["answers"] for alias in answer]
    for probe_list in f["locality"].values():
        pairs += [(p["prompt"], p["answers"][0][0]) for p in probe_list]
    return pairs


def mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------------------- probes


def test_probe_tokens_predictions_and_accuracy_match_host(parity):
    arch, tok, _, post, cases = parity
    pairs = [pair for case in cases for pair in probes(case)]
    ours = ModelScorer(post, tok).token_predictions(pairs)
    for (prompt, answer), (predicted, target) in zip(pairs, ours):
        assert target == host_answer_ids(tok, prompt, answer), (prompt, answer)  # same answer tokens
        assert predicted == host_predictions(post, tok, prompt, answer), (prompt, answer)  # same top-1 tokens
        host = host_call(compute_rewrite_or_rephrase_quality, post, arch, NO_TRUNCATION, tok, prompt, answer,
                         device="cpu")["rewrite_acc"]
        assert len(host) == 1 and token_accuracy(predicted, target) == pytest.approx(float(host[0]), abs=1e-12)
    accuracies = [token_accuracy(p, t) for p, t in ours]
    assert 0 < sum(a == 1 for a in accuracies) < len(accuracies)  # the comparison is not all-0 or all-1
    assert any(0 < a < 1 for a in accuracies)


# ---------------------------------------------------------------------------- cases


def host_case_figures(tok, pre, post, case, arch):
    """One case's figures from the host's functions, each probe scored alone, aggregated as EasyEdit's KnowEdit
    script does (mean over kinds of the mean over the kind's probes). Portability twice: with the host's input
    (first alias of the first answer) and with the best over all aliases."""
    f = case.fields
    rewrite = host_call(compute_rewrite_or_rephrase_quality, post, arch, NO_TRUNCATION, tok, f["prompt"],
                        f["target_new"], device="cpu")
    figures = {"edit_succ": float(rewrite["rewrite_acc"][0])}
    if f.get("rephrase"):
        rephrase = host_call(compute_rewrite_or_rephrase_quality, post, arch, NO_TRUNCATION, tok, f["rephrase"],
                             f["target_new"], device="cpu", test_rephrase=True)
        figures["generalization"] = float(rephrase["rephrase_acc"][0])
    first, best = {}, {}
    for kind, probe_list in f["portability"].items():
        per_probe_first, per_probe_best = [], []
        for probe in probe_list:
            scores = [float(host_call(compute_portability_quality, post, arch, NO_TRUNCATION, tok, kind,
                                      probe["prompt"], alias, device="cpu")[f"{kind}_acc"][0])
                      for answer in probe["answers"] for alias in answer]
            per_probe_first.append(scores[0])
            per_probe_best.append(max(scores))
        first[kind], best[kind] = mean(per_probe_first), mean(per_probe_best)
    locality = {}
    for kind, probe_list in f["locality"].items():
        values = []
        for probe in probe_list:
            before, after = (host_call(compute_locality_quality, model, arch, NO_TRUNCATION, tok, kind,
                                       probe["prompt"], probe["answers"][0][0], device="cpu")[f"{kind}_output"]
                             for model in (pre, post))
            values.append(float(np.mean(np.equal(after, before))))  # BaseEditor.edit's locality
        locality[kind] = mean(values)
    return figures, first, best, locality


def test_case_figures_match_host(parity):
    arch, tok, pre, post, cases = parity
    differs, localities = 0, []
    for case in cases:
        reference = knowedit.reference(ModelScorer(pre, tok), [case], OPTIONS)
        ours = knowedit.evaluate(ModelScorer(post, tok), [case], reference, OPTIONS)
        figures, first, best, locality = host_case_figures(tok, pre, post, case, arch)
        for name, value in figures.items():
            assert ours[name] == pytest.approx(100 * value, abs=1e-9), (case.case_id, name)
        for kind in best:
            assert ours[f"portability/{kind}"] == pytest.approx(100 * best[kind], abs=1e-9), (case.case_id, kind)
            assert best[kind] >= first[kind]  # the host's input: the first alias
            differs += best[kind] > first[kind]
        assert ours["portability"] == (pytest.approx(100 * mean(list(best.values())), abs=1e-9) if best else None)
        for kind, value in locality.items():
            assert ours[f"locality/{kind}"] == pytest.approx(100 * value, abs=1e-9), (case.case_id, kind)
        assert ours["locality"] == (pytest.approx(100 * mean(list(locality.values())), abs=1e-9) if locality
                                    else None)
        localities += list(locality.values())
    assert differs  # the any-alias / first-alias difference occurs in the data
    assert any(0 < v < 1 for v in localities) and min(localities) < max(localities)  # the edit moved some tokens


def test_script_aggregation_weighs_kinds_not_probes():
    """Two Reasoning probes (1.0, 0.0) and one Logical_Generalization probe (1.0): the KnowEdit script gives
    mean(0.5, 1.0) = 0.75, not the probe mean 2/3."""
    class Scorer:
        def token_predictions(self, pairs):
            table = {"r1": ([1], [1]), "r2": ([1], [2]), "lg": ([3], [3])}
            return [table.get(prompt, ([0], [0])) for prompt, _ in pairs]

    from alphaedit_plugin.evaluation.datasets import EditCase
    case = EditCase(0, 0, [], {"prompt": "p", "target_new": "t", "locality": {}, "portability": {
        "Reasoning": [{"prompt": "r1", "answers": [["a"]]}, {"prompt": "r2", "answers": [["b"]]}],
        "Logical_Generalization": [{"prompt": "lg", "answers": [["c"]]}]}})
    result = knowedit.evaluate(Scorer(), [case], [[]], OPTIONS)
    assert result["portability"] == pytest.approx(75.0)
    assert result["portability/Reasoning"] == pytest.approx(50.0)


# ---------------------------------------------------------------------------- host_evaluate (the host's pipeline)


def padded(tok, prompts, answers):
    lengths = {len(tok(p + " " + a)["input_ids"]) for p, a in zip(prompts, answers)}
    return len(lengths) > 1


def test_host_evaluate_against_ours(parity):
    """knowedit.host_evaluate (the host's functions with the KnowEdit script's inputs: one left-padded batch per
    kind, first alias) against knowedit.evaluate, case by case: equal where no batch is padded (or the model is
    rotary: Llama) and the probes list one alias; ours >= host where they list several."""
    arch, tok, pre, post, cases = parity
    host = knowedit.host_evaluate(post, tok, cases, knowedit.host_reference(pre, tok, cases, max_length=1000),
                                  max_length=1000)
    reference = knowedit.reference(ModelScorer(pre, tok), cases, OPTIONS)
    for i, case in enumerate(cases):
        ours = knowedit.evaluate(ModelScorer(post, tok), [case], reference[i:i + 1], OPTIONS)
        theirs = host["cases"][i]
        for name in ("edit_succ", "generalization"):
            if name in theirs:
                assert ours[name] == pytest.approx(100 * theirs[name], abs=1e-9)
        for metric in ("portability", "locality"):
            for kind, (prompts, answers) in knowedit.host_inputs(case, metric).items():
                if arch == "gpt2" and padded(tok, prompts, answers):
                    continue  # positions shifted by the padding: test_host_batches_shift_positions
                single = all(len(p["answers"]) == 1 and len(p["answers"][0]) == 1
                             for p in case.fields[metric][kind])
                ours_value, host_value = ours[f"{metric}/{kind}"], 100 * theirs[f"{metric}/{kind}"]
                if metric == "locality" or single:
                    assert ours_value == pytest.approx(host_value, abs=1e-9), (case.case_id, metric, kind)
                else:
                    assert ours_value >= host_value - 1e-9, (case.case_id, metric, kind)
    assert set(host) >= {"edit_succ", "portability", "locality", "fluency", "notes"}
    assert host["fluency"] is None
    if arch == "llama":  # no padding effect: the headline figures agree where the aliases do
        ours = knowedit.evaluate(ModelScorer(post, tok), cases, reference, OPTIONS)
        for name in ("edit_succ", "generalization", "locality"):
            assert ours[name] == pytest.approx(host[name], abs=1e-9)
        assert ours["portability"] >= host["portability"]


@torch.no_grad()
def test_host_batches_shift_positions(parity):
    """The host scores a kind's probes as one left-padded batch without position_ids: a row with k pads is the
    unpadded row evaluated at positions k, k+1, ... (ours: positions 0, 1, ...). Rotary Llama: the same
    predictions as ours."""
    arch, tok, _, post, cases = parity
    kind = "Reasoning"
    prompts, answers = knowedit.host_inputs(cases[1], "portability")[kind]
    assert padded(tok, prompts, answers)
    batched = host_call(compute_locality_quality, post, arch, NO_TRUNCATION, tok, kind, prompts, answers,
                        device="cpu")[f"{kind}_output"]
    ours = ModelScorer(post, tok).token_predictions(list(zip(prompts, answers)))
    width = max(len(tok(p + " " + a)["input_ids"]) for p, a in zip(prompts, answers))
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = tok(prompt + " " + answer)["input_ids"]
        shift = width - len(ids)
        logits = post(input_ids=torch.tensor([ids]), position_ids=torch.arange(shift, shift + len(ids))[None]).logits
        n_prompt = len(tok(prompt)["input_ids"])
        assert batched[row] == logits[0, n_prompt - 1:-1].argmax(-1).tolist()
        if arch == "llama":
            assert batched[row] == ours[row][0]


def test_host_scores_every_answer_token_past_max_length(parity):
    """The current host raises the truncation length to its longest prompt + answer (the 2023 PyPI release cut
    them at hparams.max_length): a probe longer than max_length is scored on all its answer tokens, as ours."""
    arch, tok, _, post, _ = parity
    limit = types.SimpleNamespace(max_length=40, alg_name="AlphaEdit")
    answer = " ".join(VOCAB[10 + i] for i in range(10))
    for length in (34, 45):
        prompt = " ".join(VOCAB[3 + i % 60] for i in range(length))
        (predicted, target), = ModelScorer(post, tok).token_predictions([(prompt, answer)])
        host = host_call(compute_rewrite_or_rephrase_quality, post, arch, limit, tok, prompt, answer,
                         device="cpu")["rewrite_acc"][0]
        assert len(tok(prompt + " " + answer)["input_ids"]) > 40 and len(target) == 10
        assert float(host) == pytest.approx(token_accuracy(predicted, target), abs=1e-12)


# ---------------------------------------------------------------------------- answer tokens (SentencePiece)


def sentencepiece_tokenizer(legacy: bool):
    """Llama-2-style SentencePiece on the tiny vocabulary: legacy (Llama 2's tokenizer.json: the normaliser
    prepends "▁" and turns spaces into "▁") or Metaspace with prepend_scheme="first" (non-legacy)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<pad>", 0.0), ("<eos>", 0.0), ("▁", -5.0)]
    pieces += [("▁" + w, -1.0) for w in VOCAB[3:] if w.isalpha()]
    assert len(pieces) <= len(VOCAB)  # fits the tiny models' embeddings
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    if legacy:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<eos>")
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.padding_side = "left"
    return tok


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_answer_tokens(legacy):
    """Our answer tokens are the joint tokenisation's tail (tracing.prompt_and_answer_ids), as the host's are:
    the same tokens and predictions, also for a legacy (Llama 2) tokenizer, where tokenising " " + answer
    alone would add a "▁" token."""
    tok = sentencepiece_tokenizer(legacy)
    model = BUILDERS["llama"]()
    prompt, answer = "The capital of France is", "Paris city"
    (predicted, target), = ModelScorer(model, tok).token_predictions([(prompt, answer)])
    host_target = host_answer_ids(tok, prompt, answer)
    assert tok.convert_ids_to_tokens(host_target) == ["▁Paris", "▁city"]
    if legacy:
        assert tok.convert_ids_to_tokens(tok(" " + answer, add_special_tokens=False)["input_ids"])[0] == "▁"
    assert target == host_target and predicted == host_predictions(model, tok, prompt, answer)


# ---------------------------------------------------------------------------- Fluency


def fluency_texts(parity):
    _, tok, _, post, cases = parity
    prompts = [c.fields["prompt"] for c in cases]
    generated = ModelScorer(post, tok).generate(prompts, 30, sample=True, seed=0)
    return [p + t for p, t in zip(prompts, generated)] + [
        "Danielle Darrieux's mother tongue is French, and French is the language of France.",
        "the the the the the", "", "one", "two words", "Paris , Rome . Paris , Rome . Paris , Berlin ."]


def test_ngram_entropy_matches_host_on_the_same_words(parity, monkeypatch):
    """The host's compute_n_gram_entropy with our word tokens is our ngram_entropy (the formula: n = 2, 3,
    weights 2/3, 4/3, log2, arithmetic mean); 100 x the host's n_gram_entropy (mean over texts) is fluency()."""
    monkeypatch.setattr(host_utils.nltk, "word_tokenize", words)
    texts = fluency_texts(parity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for text in texts:
            assert ngram_entropy(text) == pytest.approx(float(host_utils.compute_n_gram_entropy(text)), abs=1e-12)
        assert fluency(texts) == pytest.approx(100 * host_utils.n_gram_entropy(texts), abs=1e-9)
    assert len({round(ngram_entropy(t), 6) for t in texts}) > 3  # not a degenerate comparison


def punkt_installed() -> bool:
    import nltk
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


AGREE = ["The capital of France is Paris.", "Paris, Rome and Berlin are cities", "Is Rome in Italy?",
         "He was born in Germany; she was born in France!"]
DIFFER = {  # text: (nltk.word_tokenize, our words)
    "Danielle Darrieux's mother tongue is French.": (
        ["Danielle", "Darrieux", "'s", "mother", "tongue", "is", "French", "."],
        ["Danielle", "Darrieux", "'", "s", "mother", "tongue", "is", "French", "."]),
    "It isn't a well-known 3.5 km river.": (
        ["It", "is", "n't", "a", "well-known", "3.5", "km", "river", "."],
        ["It", "isn", "'", "t", "a", "well", "-", "known", "3", ".", "5", "km", "river", "."]),
}


def test_word_tokens_against_nltk():
    """The host tokenises with nltk.word_tokenize (Treebank words within punkt sentences), we with a regular
    expression: the same on plain words and punctuation, not on possessives, contractions, hyphens, numbers.
    Single-sentence texts, so without punkt's data word_tokenize(preserve_line=True) is the same tokenizer."""
    import nltk
    tokenize = nltk.word_tokenize if punkt_installed() else (lambda t: nltk.word_tokenize(t, preserve_line=True))
    for text in AGREE:
        assert words(text) == tokenize(text)
    for text, (theirs, ours) in DIFFER.items():
        assert tokenize(text) == theirs and words(text) == ours


def test_host_evaluate_fluency_runs(parity, monkeypatch):
    """host_evaluate(fluency=True) goes through the host's test_generation_quality (generate_fast + n_gram_entropy),
    repeatably for a seed. nltk's punkt data is absent offline: single-line Treebank words instead. 40 tokens,
    not the host's 100: the tiny GPT-2 has 64 positions."""
    import nltk
    if not punkt_installed():
        original = nltk.word_tokenize
        monkeypatch.setattr(nltk, "word_tokenize", lambda text: original(text, preserve_line=True))
    _, tok, pre, post, cases = parity
    cases = cases[:2]
    reference = knowedit.host_reference(pre, tok, cases)
    runs = [knowedit.host_evaluate(post, tok, cases, reference, fluency=True, seed=3,
                                    generation_length=40)["fluency"] for _ in range(2)]
    assert runs[0] == runs[1] and 0 < runs[0] < 1000


# ---------------------------------------------------------------------------- through BaseEditor, on SmolLM2


@pytest.mark.real_model
def test_base_editor_scores_the_plugins_alphaedit_on_smollm2_as_ours_does(tmp_path, monkeypatch, capsys,
                                                                          smollm2_stats_dir):
    """KnowEdit ZsRE records edited one after another through ``BaseEditor.edit(sequential_edit=True)`` with the
    plugin's AlphaEdit: the host's compute_edit_quality / portability / locality and summary_metrics give their
    usual output, and, case by case on the same edited model, the figures of knowedit.evaluate relate to them as
    the module docstring says: Edit Succ., Generalization and Locality equal; Portability at least the host's
    (ours takes the best alias, the host the first)."""
    from easyeditor import BaseEditor
    from easyeditor.editors.utils import summary_metrics

    from alphaedit_plugin import AlphaEditHyperParams
    from conftest import use_smollm2_statistics

    models = pytest.importorskip("alphaedit_plugin.models")
    try:
        model, tok = models.load_smollm2()
    except models.ModelNotAvailableError as error:
        pytest.skip(f"SmolLM2 is not available: {error}")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowedit" / "ZsRE" / "ZsRE-test-all.json"
    cases = load_dataset(shared if shared.is_file() else FIXTURES / "knowedit_zsre.json").cases[:2]
    monkeypatch.chdir(tmp_path)  # the host writes logs/ into the working directory
    hparams = use_smollm2_statistics(AlphaEditHyperParams.from_hparams(
        Path(__file__).resolve().parents[1] / "hparams" / "AlphaEdit" / "smollm2-135m.yaml"), smollm2_stats_dir)
    hparams.model_name = (model, tok)
    editor = BaseEditor.from_hparams(hparams)
    all_metrics = []
    for case in cases:  # one call per case: the host's "pre" and our locality reference see the same model
        reference = knowedit.reference(ModelScorer(editor.model, tok), [case], OPTIONS)
        metrics, edited, _ = editor.edit(**knowedit.host_edit_arguments([case]), sequential_edit=True,
                                         verbose=False)
        ours = knowedit.evaluate(ModelScorer(edited, tok), [case], reference, OPTIONS)
        host = knowedit.host_case_figures(metrics[0])
        assert set(metrics[0]["post"]) >= {"rewrite_acc", "locality", "portability"}
        assert ours["edit_succ"] == pytest.approx(100 * host["edit_succ"], abs=1e-9)
        if "generalization" in host:
            assert ours["generalization"] == pytest.approx(100 * host["generalization"], abs=1e-9)
        assert ours["locality"] == pytest.approx(100 * host["locality"], abs=1e-9)
        assert ours["portability"] >= 100 * host["portability"] - 1e-9
        all_metrics += metrics
    assert all(m["post"]["rewrite_acc"][0] > m["pre"]["rewrite_acc"][0] for m in all_metrics)  # the edits took
    capsys.readouterr()
    summary_metrics(all_metrics)  # prints the means and writes logs/results.json, as after EasyEdit's own runs
    printed = capsys.readouterr().out
    assert "Metrics Summary:" in printed and "'rewrite_acc'" in printed and "Relation_Specificity_acc" in printed
    saved = json.loads((tmp_path / "logs" / "results.json").read_text())
    assert len(saved) == len(cases) and saved[0]["requested_rewrite"]["target_new"] == cases[0].fields["target_new"]


def test_the_benchmark_scores_knowedit_with_the_hosts_evaluators_too(tmp_path):
    from alphaedit_plugin.bench import BenchConfig, BenchmarkError, MethodOptions, run_benchmark
    from conftest import build_llama, exact_hparams

    model, tok = build_llama(), host_tokenizer()
    options = {"AlphaEdit": MethodOptions(hparams=exact_hparams(tmp_path, "llama", v_num_grad_steps=8))}

    def config(data, out):
        return BenchConfig(methods=["AlphaEdit", "unedited"], dataset=str(FIXTURES / data), edits=2, batch_size=2,
                           output=str(tmp_path / out), model_name="tiny-llama", method_options=options,
                           plots=False, host_evaluators=True)

    results = run_benchmark(config("knowedit_recent.json", "run"), model, tok)
    pre, alpha = results["pre_host"], results["methods"]["AlphaEdit"]
    assert set(pre) >= {"edit_succ", "portability", "locality"}
    assert results["methods"]["unedited"]["final_host"]["edit_succ"] == pre["edit_succ"]
    assert alpha["final_host"]["edit_succ"] >= pre["edit_succ"] and alpha["final_host"]["locality"] <= 100
    assert "Scored by EasyEdit's own evaluators" in (tmp_path / "run" / "results.md").read_text()
    with pytest.raises(BenchmarkError, match="--host-evaluators scores KnowEdit runs"):
        run_benchmark(config("counterfact_flat.json", "cf"), model, tok)


def test_host_fluency_unavailable_names_the_missing_nltk_data(monkeypatch):
    import nltk

    def missing(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)
    assert "punkt_tab" in knowedit.host_fluency_unavailable()
    monkeypatch.setattr(nltk.data, "find", lambda resource, *args, **kwargs: resource)
    assert knowedit.host_fluency_unavailable() is None


def test_the_benchmark_scores_the_rest_with_the_hosts_evaluators_without_nltk_data(tmp_path, monkeypatch, caplog):
    """Offline, NLTK's punkt_tab data is missing and the host's Fluency cannot run: the run says so before any
    work, scores the host's other figures and the plugin's own Fluency, and notes what is missing."""
    from alphaedit_plugin.bench import BenchConfig, MethodOptions, run_benchmark
    from alphaedit_plugin.evaluation import EvalOptions
    from conftest import build_llama, exact_hparams

    monkeypatch.setattr(knowedit, "host_fluency_unavailable", lambda: "NLTK's punkt_tab data is not installed")
    model, tok = build_llama(), host_tokenizer()
    options = {"AlphaEdit": MethodOptions(hparams=exact_hparams(tmp_path, "llama", v_num_grad_steps=8))}
    config = BenchConfig(methods=["AlphaEdit"], dataset=str(FIXTURES / "knowedit_recent.json"), edits=2,
                         batch_size=2, output=str(tmp_path / "run"), model_name="tiny-llama", method_options=options,
                         plots=False, host_evaluators=True, eval=EvalOptions(fluency=True, generation_tokens=16))
    with caplog.at_level("WARNING"):
        results = run_benchmark(config, model, tok)
    assert "will score no Fluency" in caplog.text
    assert results["pre_host"]["fluency"] is None and results["methods"]["AlphaEdit"]["final_host"]["fluency"] is None
    assert results["pre"]["fluency"] > 0 and results["methods"]["AlphaEdit"]["final"]["fluency"] > 0
    assert "EasyEdit's Fluency not scored: NLTK's punkt_tab" in (tmp_path / "run" / "results.md").read_text()
