"""Loaders: every schema on hand-written fixtures, and bad input named by file, record and field."""

import json
from pathlib import Path

import pytest

from alphaedit_plugin import normalise_requests
from alphaedit_plugin.evaluation import DatasetError, load_dataset, normalise_answers

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name, schema, family, n_cases, n_requests", [
    ("counterfact_flat.json", "counterfact_flat", "counterfact", 5, 5),
    ("counterfact_rome.json", "counterfact_rome", "counterfact", 1, 1),
    ("zsre_mend.json", "zsre_mend", "zsre", 2, 2),
    ("knowedit_zsre.json", "knowedit", "knowedit", 1, 1),
    ("knowedit_recent.json", "knowedit", "knowedit", 2, 2),
    ("knowedit_wikibio.json", "knowedit_wikibio", "knowedit", 1, 1),
    ("mquake.json", "mquake", "mquake", 2, 3),
    ("leme_counterfact.json", "leme_counterfact", "leme", 1, 1),
])
def test_each_schema_loads_into_valid_requests(name, schema, family, n_cases, n_requests):
    dataset = load_dataset(FIXTURES / name)
    assert (dataset.schema, dataset.family, len(dataset)) == (schema, family, n_cases)
    requests = [r for case in dataset.cases for r in case.requests]
    assert len(requests) == n_requests
    normalised = normalise_requests(requests)  # the core accepts every request the loaders make
    assert all(r.subject in r.prompt for r in normalised)


def test_rome_fields():
    case = load_dataset(FIXTURES / "counterfact_rome.json").cases[0]
    f = case.fields
    assert f["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert (f["target_new"], f["target_true"]) == ("English", "French")
    assert len(f["paraphrases"]) == 2 and len(f["neighbourhood"]) == 4
    assert all(answer == "French" for _, answer in f["neighbourhood"])  # neighbours keep the true object
    assert case.case_id == 7 and f["relation_id"] == "P103" and f["target_new_id"] == "Q1860"


def test_knowedit_nested_alias_lists():
    assert normalise_answers("Paris") == [["Paris"]]
    assert normalise_answers(["Paris", "City of Light"]) == [["Paris", "City of Light"]]
    assert normalise_answers([["English", "en"], ["French"]]) == [["English", "en"], ["French"]]
    assert normalise_answers([["Cesis"]]) == [["Cesis"]]
    recent = load_dataset(FIXTURES / "knowedit_recent.json").cases
    probe = recent[0].fields["portability"]["Logical_Generalization"][0]
    assert probe["answers"] == [["English", "English language", "en"], ["French", "fr"]]
    assert recent[0].fields["locality"] == {} and recent[1].fields["portability"] == {}
    zsre = load_dataset(FIXTURES / "knowedit_zsre.json").cases[0]
    assert zsre.fields["portability"]["Reasoning"][0]["answers"] == [["Owlet moths"]]  # a plain string
    assert zsre.fields["ground_truth"] == [["Aspidoceratidae"]]


def test_mquake_case_edits_all_rewrites():
    case = load_dataset(FIXTURES / "mquake.json").cases[0]
    assert [r["subject"] for r in case.requests] == ["Hey Jude", "Madonna"]
    assert case.fields["new_answers"] == ["Narendra Modi", "Modi", "NaMo"]
    assert case.fields["new_single_hops"][0]["answers"] == ["Madonna", "Madonna Ciccone"]


def test_leme_coupled_entities():
    f = load_dataset(FIXTURES / "leme_counterfact.json").cases[0].fields
    assert f["subject_facts"] == ["actor", "France", "Paris"]
    assert f["related"][0]["entity"] == "Paris" and f["related"][0]["facts"] == ["France", "Seine"]


def test_jsonl_is_accepted(tmp_path):
    records = json.loads((FIXTURES / "zsre_mend.json").read_text())
    path = tmp_path / "z.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    assert load_dataset(path).schema == "zsre_mend"


def _write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("content, expected", [
    ("", "the file is empty"),
    ("[]", "no records"),
    ('{"a": 1}', "unknown schema"),
    ('[{"question": "q", "answer": "a"}]', "record 0: unknown schema"),
    ("not json", "not valid JSON"),
])
def test_bad_files(tmp_path, content, expected):
    path = _write(tmp_path, content)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_missing_field_names_file_record_and_field(tmp_path):
    records = json.loads((FIXTURES / "counterfact_flat.json").read_text())
    del records[3]["rephrase_prompt"]
    path = _write(tmp_path, records)
    with pytest.raises(DatasetError, match=r"data\.json: record 3 \(case_id 3\), field 'rephrase_prompt': missing"):
        load_dataset(path)


def test_nested_missing_field(tmp_path):
    records = json.loads((FIXTURES / "mquake.json").read_text())
    del records[1]["requested_rewrite"][0]["target_new"]
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 2\), field 'requested_rewrite\[0\]\.target_new': missing"):
        load_dataset(_write(tmp_path, records))


def test_subject_not_in_prompt(tmp_path):
    records = json.loads((FIXTURES / "zsre_mend.json").read_text())
    records[1]["subject"] = "Amazon"
    with pytest.raises(DatasetError, match=r"record 1, field 'src': the subject 'Amazon' does not occur"):
        load_dataset(_write(tmp_path, records))


def test_bad_ground_truth_type(tmp_path):
    records = json.loads((FIXTURES / "knowedit_recent.json").read_text())
    records[1]["locality"]["Relation_Specificity"][1]["ground_truth"] = [[3]]
    with pytest.raises(DatasetError, match=r"record 1, field 'locality\.Relation_Specificity\[1\]\.ground_truth'"):
        load_dataset(_write(tmp_path, records))


def test_more_edits_than_records():
    dataset = load_dataset(FIXTURES / "zsre_mend.json")
    assert len(dataset.take(2)) == 2
    with pytest.raises(DatasetError, match=r"zsre_mend\.json: 5 edits requested but the file has only 2 records"):
        dataset.take(5)


def test_family_check():
    with pytest.raises(DatasetError, match="not a zsre dataset"):
        load_dataset(FIXTURES / "counterfact_flat.json", family="zsre")


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope.json")


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent (real benchmark files)")
@pytest.mark.parametrize("relative, schema", [
    ("counterfact/counterfact-edit.json", "counterfact_flat"),
    ("counterfact/rome/counterfact_portability_gpt4.json", "counterfact_rome"),
    ("zsre/zsre_mend_train-1k.json", "zsre_mend"),
    ("knowedit/ZsRE/ZsRE-test-all.json", "knowedit"),
    ("knowedit/wiki_recent/recent_train.json", "knowedit"),
    ("knowedit/wiki_counterfact/train_cf.json", "knowedit"),
    ("knowedit/WikiBio/wikibio-test-all.json", "knowedit_wikibio"),
    ("mquake/MQuAKE-hard.json", "mquake"),
])
def test_real_files_load(relative, schema):
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    dataset = load_dataset(path, skip_bad_records=True)  # zsre_mend_train-1k has two records with an empty alt
    assert dataset.schema == schema and len(dataset.skipped) <= len(dataset) // 100


def test_skip_bad_records(tmp_path):
    records = json.loads((FIXTURES / "zsre_mend.json").read_text())
    records[0]["alt"] = ""
    path = _write(tmp_path, records)
    with pytest.raises(DatasetError, match=r"record 0, field 'alt': is empty"):
        load_dataset(path)
    dataset = load_dataset(path, skip_bad_records=True)
    assert len(dataset) == 1 and dataset.cases[0].index == 1 and "record 0, field 'alt'" in dataset.skipped[0]


# -- several files as one data set ---------------------------------------------------------------------------------
def test_several_files_of_one_schema_are_one_data_set_in_order(tmp_path):
    from alphaedit_plugin.evaluation import load_datasets

    records = json.loads((FIXTURES / "zsre_mend.json").read_text())
    second = [dict(r, src=r["src"] + " really", rephrase=r["rephrase"]) for r in records]  # other edits
    second_path = tmp_path / "second.json"
    second_path.write_text(json.dumps(second))
    one, two = load_dataset(FIXTURES / "zsre_mend.json"), load_dataset(second_path)
    both = load_datasets([FIXTURES / "zsre_mend.json", second_path])
    assert both.schema == "zsre_mend" and both.path == f"{one.path} + {two.path}"
    assert [c.requests for c in both.cases] == [c.requests for c in one.cases + two.cases]
    assert [c.index for c in both.cases] == list(range(len(one) + len(two)))  # positions in the concatenation
    with pytest.raises(DatasetError, match=r"5 edits requested but the files hold only 4 records"):
        both.take(5)
    assert load_datasets([FIXTURES / "zsre_mend.json"]) == one


def test_several_files_must_share_a_schema_and_no_edit(tmp_path):
    from alphaedit_plugin.evaluation import load_datasets

    with pytest.raises(DatasetError, match=r"different schemas .*zsre_mend.*counterfact_flat"):
        load_datasets([FIXTURES / "zsre_mend.json", FIXTURES / "counterfact_flat.json"])
    with pytest.raises(DatasetError, match=r"record 0 edits .* does already; give files without shared records"):
        load_datasets([FIXTURES / "zsre_mend.json", FIXTURES / "zsre_mend.json"])
    with pytest.raises(DatasetError, match="no benchmark file"):
        load_datasets([])
