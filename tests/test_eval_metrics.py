"""Each metric on hand-made fixtures with answers computed by hand (a fake scorer) or independently (tiny model)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alphaedit_plugin.evaluation import EvalOptions, ModelScorer, counterfact, knowedit, leme, load_dataset, mquake, zsre
from alphaedit_plugin.evaluation import glue, representation
from alphaedit_plugin.evaluation.datasets import DatasetError
from alphaedit_plugin.evaluation.fluency import fluency, ngram_entropy, tfidf_similarity
from alphaedit_plugin.evaluation.counterfact import counterfact_scores

from conftest import build_gpt2, build_llama, make_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


class FakeScorer:
    """Answers from tables: nll[(prompt, answer)], tokens[(prompt, answer)] = (predicted, target), text[prompt]."""

    def __init__(self, nll=None, tokens=None, text=None, default_nll=5.0):
        self.nll_table, self.tokens, self.text, self.default_nll = nll or {}, tokens or {}, text or {}, default_nll
        self.generated = []

    def nll(self, pairs):
        return [self.nll_table.get(tuple(p), self.default_nll) for p in pairs]

    def token_predictions(self, pairs):
        return [self.tokens.get(tuple(p), ([0], [1])) for p in pairs]

    def generate(self, prompts, max_new_tokens, sample=False, top_k=5, seed=0):
        self.generated += list(prompts)
        return [self.text.get(p, "") for p in prompts]


# ---------------------------------------------------------------------------- CounterFact

def test_counterfact_rome_by_hand():
    case = load_dataset(FIXTURES / "counterfact_rome.json").cases
    f = case[0].fields
    nll = {(f["prompt"], "English"): 1.0, (f["prompt"], "French"): 2.0,  # efficacy: new wins -> 1
           ("Danielle Darrieux speaks", "English"): 3.0, ("Danielle Darrieux speaks", "French"): 1.0,  # loses
           ("Where Danielle Darrieux is from, people speak", "English"): 0.5,  # wins (French at default 5.0)
           # neighbours: the true answer French must keep winning: 3 of 4 do
           ("The mother tongue of Michel Rocard is", "French"): 1.0,
           ("Jean Gabin speaks", "French"): 1.0,
           ("The native language of Louis Jouvet is", "French"): 1.0,
           ("Brigitte Bardot speaks", "English"): 1.0, ("Brigitte Bardot speaks", "French"): 2.0}
    result = counterfact.evaluate(FakeScorer(nll), case, [None], EvalOptions())
    assert result["efficacy"] == 100 and result["generalization"] == 50 and result["specificity"] == 75
    assert result["fluency"] is None and any("pass --fluency" in n for n in result["notes"])


def test_counterfact_fluency_uses_generation_prompts_and_says_consistency_missing():
    cases = load_dataset(FIXTURES / "counterfact_rome.json").cases
    prompt = "Danielle Darrieux's mother tongue is"
    scorer = FakeScorer(text={prompt: " x"})  # generated text = prompt + " x"
    result = counterfact.evaluate(scorer, cases, [None], EvalOptions(fluency=True, fluency_prompts=2))
    assert scorer.generated == [prompt, "Danielle Darrieux was born in"]  # duplicates dropped, 2 prompts
    expected = fluency([prompt + " x", "Danielle Darrieux was born in"])
    assert result["fluency"] == pytest.approx(expected)
    assert result["consistency"] is None and any("no reference text" in n for n in result["notes"])
    snippets = {("P103", "Q1860"): ["Danielle Darrieux's mother tongue is x"]}
    result = counterfact.evaluate(scorer, cases, [None], EvalOptions(fluency=True, fluency_prompts=1, snippets=snippets))
    assert result["consistency"] == pytest.approx(100.0)  # the generation equals the reference text


def test_counterfact_fluency_generates_all_cases_in_one_batched_call_and_maps_texts_back():
    import copy

    first = load_dataset(FIXTURES / "counterfact_rome.json").cases[0]
    second = copy.deepcopy(first)
    second.fields["generation_prompts"] = ["Repeat repeat"]
    calls = []

    class Recording(FakeScorer):
        def generate(self, prompts, *args, **kwargs):
            calls.append(list(prompts))
            return super().generate(prompts, *args, **kwargs)

    scorer = Recording(text={"Repeat repeat": " repeat repeat repeat repeat", "Danielle Darrieux was born in": " Paris"})
    result = counterfact.evaluate(scorer, [first, second], [None, None], EvalOptions(fluency=True, fluency_prompts=2))
    assert len(calls) == 1 and calls[0][-1] == "Repeat repeat"  # one call for both cases, in case order
    per_case = [fluency([first.fields["generation_prompts"][0], "Danielle Darrieux was born in Paris"]),
                fluency(["Repeat repeat repeat repeat repeat repeat"])]
    assert per_case[0] != per_case[1]
    assert result["fluency"] == pytest.approx(sum(per_case) / 2)


@pytest.mark.parametrize("builder", [build_gpt2, build_llama])
def test_counterfact_flat_on_a_tiny_model_matches_the_core_metric(builder):
    model, tok = builder(), make_tokenizer()
    dataset = load_dataset(FIXTURES / "counterfact_flat.json")
    import json

    records = json.loads((FIXTURES / "counterfact_flat.json").read_text())
    ours = counterfact.evaluate(ModelScorer(model, tok), dataset.cases, [None] * 5, EvalOptions())
    core = counterfact_scores(model, tok, records)
    for name in ("efficacy", "generalization", "specificity"):
        assert ours[name] == pytest.approx(core[name])


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("a") == 0.0
    assert fluency(["a b a b", "a"]) == pytest.approx(100 * ngram_entropy("a b a b") / 2)


def test_tfidf_similarity():
    assert tfidf_similarity("Paris is in France", "Paris is in France") == pytest.approx(1.0)
    assert tfidf_similarity("Paris France", "Rome Italy") == 0.0


# ---------------------------------------------------------------------------- ZsRE

def test_zsre_by_hand():
    cases = load_dataset(FIXTURES / "zsre_mend.json").cases
    tokens = {("What is the product made by UniFirst?", "unmanned aircraft"): ([5, 6], [5, 6]),  # 1.0
              ("What does UniFirst make?", "unmanned aircraft"): ([5, 9], [5, 6]),  # 0.5
              ("nq question: who wrote the big lebowski?", "the Coen brothers"): ([1, 2, 9], [1, 2, 3]),  # 2/3
              ("Which continent is the Nile in?", "Asia"): ([4], [7]),  # 0
              ("On which continent does the Nile flow?", "Asia"): ([7], [7]),  # 1
              ("nq question: capital of peru?", "Lima"): ([8], [8])}  # 1
    result = zsre.evaluate(FakeScorer(tokens=tokens), cases, [None, None], EvalOptions())
    assert result["efficacy"] == pytest.approx(50.0)
    assert result["generalization"] == pytest.approx(75.0)
    assert result["specificity"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_token_predictions_match_an_independent_greedy_loop():
    model, tok = build_llama(), make_tokenizer()
    prompt, answer = "The capital of France", "Paris is famous"
    [(predicted, target)] = ModelScorer(model, tok).token_predictions([(prompt, answer)])
    ids = tok(prompt)["input_ids"]
    expected = []
    for word in answer.split():
        with torch.no_grad():
            expected.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        ids = ids + tok(word, add_special_tokens=False)["input_ids"]
    assert predicted == expected and target == tok(" " + answer, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- KnowEdit

def test_knowedit_aliases_portability_and_locality():
    cases = load_dataset(FIXTURES / "knowedit_recent.json").cases
    a, b = cases
    lg = "The official language of Lac Otelnuk is"
    tokens = {(a.fields["prompt"], "Canada"): ([1, 2], [1, 3]),  # edit succ 0.5
              (lg, "English"): ([1], [2]), (lg, "en"): ([3], [4]), (lg, "fr"): ([5], [5]),  # best alias "fr": 1.0
              ("The capital of the country of Lac Otelnuk is", "Ottawa"): ([1], [2]),  # 0
              ("The capital of the country of Lac Otelnuk is", "Bytown"): ([0, 0], [0, 3]),  # 0.5
              (b.fields["prompt"], "female"): ([4], [4]),  # 1.0
              ("The place of birth of Ingrida Amantova is", "Cesis"): ([7, 8], [0, 0]),  # post predictions
              ("The country of Ingrida Amantova is", "Soviet Union"): ([9, 9], [0, 0])}
    reference = [[], [[7, 8], [9, 1]]]  # pre-edit predictions: first probe agrees fully, second half
    result = knowedit.evaluate(FakeScorer(tokens=tokens), cases, reference, EvalOptions())
    assert result["edit_succ"] == pytest.approx(75.0)
    assert result["portability"] == pytest.approx(100 * (1.0 + 0.5) / 2)  # one case with probes
    assert result["portability/Logical_Generalization"] == pytest.approx(100.0)
    assert result["locality"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert any("portability: 1 of 2 cases" in n for n in result["notes"])


def test_knowedit_reference_reads_locality_predictions():
    cases = load_dataset(FIXTURES / "knowedit_zsre.json").cases
    tokens = {("The taxon rank of Epaspidoceras is", "genus"): ([3], [9]), ("Epaspidoceras taxon rank", "genus"): ([4], [9])}
    assert knowedit.reference(FakeScorer(tokens=tokens), cases, EvalOptions()) == [[[3], [4]]]


def test_knowedit_wikibio_has_no_portability():
    cases = load_dataset(FIXTURES / "knowedit_wikibio.json").cases
    result = knowedit.evaluate(FakeScorer(), cases, [[[0]]], EvalOptions())
    assert result["portability"] is None and result["locality"] == 100.0


# ---------------------------------------------------------------------------- MQuAKE

def test_mquake_multihop_and_cot():
    cases = load_dataset(FIXTURES / "mquake.json").cases
    q1, q2 = cases[0].fields["questions"]
    q3 = cases[1].fields["questions"][0]
    text = {mquake.qa_prompt(q1): " Brian Epstein\nQ: more", mquake.qa_prompt(q2): " It is Modi.\n",
            mquake.qa_prompt(q3): " Hindi",
            "Hey Jude was performed by": " Madonna", "The director of Madonna is": " the Pope",
            "Narendra Modi is a citizen of": " AUS and more",
            mquake.cot_prompt(q1): " Hey Jude was performed by Madonna. Madonna's director is Modi.\nAnswer: Narendra Modi\n",
            mquake.cot_prompt(q3): " blah"}
    result = mquake.evaluate(FakeScorer(text=text), cases, [None, None], EvalOptions())
    assert result["multihop_accuracy"] == 50.0  # case 1 (second phrasing), not case 2
    assert result["old_answer_rate"] == 100.0  # case 1's first phrasing names Brian Epstein, case 2 says Hindi
    assert result["new_single_hop_accuracy"] == pytest.approx(100 * 2 / 3)
    assert result["multihop_cot_accuracy"] == 50.0
    assert result["cot_format_followed"] == pytest.approx(100 / 3)
    assert any("does not follow" in n for n in result["notes"])


def test_alias_matching_is_whole_word():
    assert mquake.matches("it is Modi.", ["Modi"]) and not mquake.matches("modified", ["Modi"])
    assert mquake.cot_answer("x\nAnswer: Paris\nmore") == "Paris" and mquake.cot_answer("nothing") is None


# ---------------------------------------------------------------------------- LEME

def test_leme_lexical_measures():
    cases = load_dataset(FIXTURES / "leme_counterfact.json").cases
    text = {leme.subject_prompt(cases[0]): " Jean Gabin is an actor from Canada.",
            leme.related_prompt(cases[0]): " Paris is the capital of France."}
    result = leme.evaluate(FakeScorer(text=text), cases, [None], EvalOptions())
    assert result["edit_mention"] == 100.0 and result["old_mention"] == 0.0
    assert result["subject_fact_recall"] == pytest.approx(50.0)  # actor yes, Paris no (France is the old target)
    assert result["related_fact_recall"] == pytest.approx(50.0)  # France yes, Seine no


# ---------------------------------------------------------------------------- GLUE

def test_weighted_f1_and_mcc_by_hand():
    gold, pred = [0, 0, 1, 1], [0, 1, 1, -1]
    # class 0: p=1, r=0.5, f1=2/3 ; class 1: p=0.5, r=0.5, f1=0.5 ; weights 2/4 each; -1 has no support
    assert glue.weighted_f1(gold, pred) == pytest.approx((2 / 3 + 0.5) / 2)
    assert glue.matthews([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert glue.matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert glue.matthews([0, 0], [0, 0]) == 0.0


def test_label_codings_differ_between_rte_and_nli():
    rte = glue.load_task(FIXTURES / "glue", "rte", n=2, start=0)
    nli = glue.load_task(FIXTURES / "glue", "nli", n=2, start=0)
    assert [i.gold for i in rte.items] == [0, 1] and [i.gold for i in nli.items] == [1, 0]  # both: entailed first
    # " True" means entailment: class 0 in rte's GLUE coding, class 1 in nli's
    assert dict(rte.candidates)[" True"] == 0 and dict(nli.candidates)[" True"] == 1
    assert dict(glue.load_task(FIXTURES / "glue", "rte", 2, 0, rte_mapping="repo").candidates)[" True"] == 1


def test_label_text_mismatch_is_an_error(tmp_path):
    import json
    import shutil

    shutil.copytree(FIXTURES / "glue", tmp_path / "g")
    records = json.loads((tmp_path / "g" / "nli.json").read_text())
    records[1]["label"] = 1  # says entailment in nli's coding, but label_text says not_entailment
    (tmp_path / "g" / "nli.json").write_text(json.dumps(records))
    with pytest.raises(DatasetError, match=r"nli\.json: record 1, field 'label'"):
        glue.load_task(tmp_path / "g", "nli", n=2, start=0)
    with pytest.raises(DatasetError, match="records 0..9 requested but the file has 2"):
        glue.load_task(FIXTURES / "glue", "rte", n=10, start=0)


def test_glue_scores_by_hand():
    task = glue.load_task(FIXTURES / "glue", "sst2", n=4, start=0)
    p = [i.prompt for i in task.items]
    assert p[0] == "Review :a gripping story \nSentiment :"
    nll = {(p[0], " positive"): 1.0, (p[0], " negative"): 2.0,  # -> 1 correct
           (p[1], " positive"): 2.0, (p[1], " negative"): 2.0,  # tie -> 0 (the second) correct
           (p[2], " positive"): 3.0, (p[2], " negative"): 1.0,  # -> 0 wrong
           (p[3], " positive"): 1.0, (p[3], " negative"): 3.0}  # -> 1 wrong
    text = {p[0]: " positive!", p[1]: " negative", p[2]: " meh", p[3]: " not positive or negative"}
    result = glue.score_task(FakeScorer(nll, text=text), task)
    assert result["accuracy_new"] == 0.5 and result["f1_new"] == pytest.approx(0.5)
    assert (result["correct"], result["incorrect"], result["invalid"]) == (2, 1, 1)  # 'positive' checked first
    mmlu = glue.load_task(FIXTURES / "glue", "mmlu", n=3, start=0)
    q = [i.prompt for i in mmlu.items]
    assert q[1] == "Question: Capital of France?\n(A) Rome\n(B) Paris\n(C) Berlin\n(D) Madrid\nAnswer:"
    nll = {(q[0], " A"): 1.0, (q[1], " B"): 1.0, (q[1], " C"): 1.0, (q[2], " C"): 0.5}  # q[1]: a tie -> invalid
    assert glue.likelihood_predictions(FakeScorer(nll), mmlu) == [0, -1, 2]
    assert glue._parse_letter(" b\n") == 1 and glue._parse_letter(" b") == -1


def test_evaluate_general_on_a_tiny_model():
    scores = glue.evaluate_general(ModelScorer(build_gpt2(), make_tokenizer()), FIXTURES / "glue",
                                   tasks=["sst2", "mmlu"], n=2, start=0)
    assert set(scores) == {"sst2", "mmlu"} and scores["sst2"]["n"] == 2
    assert 0 <= scores["mmlu"]["f1_new"] <= 1 and scores["sst2"]["correct"] + scores["sst2"]["incorrect"] \
        + scores["sst2"]["invalid"] == 2


# ---------------------------------------------------------------------------- representation

def test_hausdorff_by_hand():
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.0, 1.0]])
    assert representation.hausdorff(a, b) == pytest.approx(math.sqrt(2))


def test_shift_figures():
    rng = np.random.default_rng(0)
    before = rng.normal(size=(40, 6))
    same = representation.shift_figures(before, before.copy())
    assert same["relative_shift"] == 0 and same["hausdorff"] == 0 and same["overlap"] == pytest.approx(1.0)
    assert same["inside_ellipse"] >= 0.85
    moved = representation.shift_figures(before, before + 50.0)
    assert moved["overlap"] < 1e-6 and moved["inside_ellipse"] == 0.0
    low, high = moved["relative_shift_ci95"]
    assert low <= moved["relative_shift"] <= high


def test_hidden_states_and_plot(tmp_path):
    model, tok = build_gpt2(), make_tokenizer()
    prompts = ["The capital of France", "The river located in Spain", "The mother tongue of Einstein", "Apple"]
    states = representation.hidden_states(model, tok, prompts, layer=2)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tok(prompts[1])["input_ids"]]), output_hidden_states=True)
    assert states.shape == (4, 32)
    assert np.allclose(states[1], expected.hidden_states[3][0, -1].numpy(), atol=1e-5)  # output of block 2
    assert representation.hidden_states(model, tok, prompts).shape == (4, 32)  # default: the last block
    pytest.importorskip("matplotlib")
    assert representation.plot_projection(states, {"AlphaEdit": states + 0.1}, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_batched_generation_equals_one_prompt_at_a_time(arch, tokenizer, monkeypatch):
    """Left-padded batches give the greedy text of unpadded one-by-one generation, on both weight layouts."""
    from conftest import BUILDERS

    from alphaedit_plugin.evaluation import scoring

    model = BUILDERS[arch]().eval()
    scorer = scoring.ModelScorer(model, tokenizer)
    prompts = ["Paris is in", "The Eiffel Tower is located in the city of", "Rome", "Danielle Darrieux speaks"]
    monkeypatch.setattr(scoring, "GENERATION_BATCH", 1)
    alone = scorer.generate(prompts, max_new_tokens=6)
    monkeypatch.setattr(scoring, "GENERATION_BATCH", 3)  # a full batch and a remainder, of mixed lengths
    batched = scorer.generate(prompts, max_new_tokens=6)
    assert batched == alone
    assert all(text.strip() for text in alone)
    sampled = [scorer.generate(prompts, max_new_tokens=6, sample=True, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded: repeatable
