"""Loaders for the editing benchmarks' JSON schemas, with errors that name the file, the record and the field.

Every loader turns one record into an :class:`EditCase`: the edit requests
(ROME form, ``prompt`` with ``{}``; what :func:`alphaedit_plugin.normalise_requests`
accepts) and the fields its metric family needs, under fixed names.

Schemas (detected from the first record, then checked on every record):

====================  =============================================================  ==========
schema                fields                                                          family
====================  =============================================================  ==========
counterfact_flat      EasyEdit flat CounterFact: prompt, subject, target_new,        counterfact
                      ground_truth, rephrase_prompt, locality_prompt,
                      locality_ground_truth
counterfact_rome      ROME/MEMIT: requested_rewrite{prompt with {}, subject,          counterfact
                      target_new{str}, target_true{str}}, paraphrase_prompts,
                      neighborhood_prompts (generation_prompts optional)
zsre_mend             MEND zsRE: subject, src, alt, rephrase, loc, loc_ans            zsre
knowedit              KnowEdit ZsRE / wiki_recent / wiki_counterfact: subject,        knowedit
                      prompt, target_new, locality{}, portability{} (ground truths
                      may be a string, a list of aliases or a list of alias lists)
knowedit_wikibio      KnowEdit WikiBio: text, labels, concept, locality{}             knowedit
mquake                MQuAKE: requested_rewrite[] (several edits), questions,         mquake
                      new_answer, new_answer_alias (answer, new_single_hops optional)
leme_counterfact      LEME (Rosati et al. 2024): counterfact_rome plus                leme
                      coupled_prompts_and_properties{subject_entity, coupled_entities}
leme_zsre             LEME: zsre_mend plus coupled_prompts_and_properties             leme
====================  =============================================================  ==========
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

logger = logging.getLogger(__name__)

SCHEMA_FAMILY = {
    "counterfact_flat": "counterfact",
    "counterfact_rome": "counterfact",
    "zsre_mend": "zsre",
    "knowedit": "knowedit",
    "knowedit_wikibio": "knowedit",
    "mquake": "mquake",
    "leme_counterfact": "leme",
    "leme_zsre": "leme",
}
FAMILIES = sorted(set(SCHEMA_FAMILY.values()))


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file, the record and the field."""


@dataclass
class EditCase:
    """One benchmark case: the edits to make and what to evaluate afterwards."""

    index: int  # position in the file
    case_id: Any
    requests: List[Dict[str, Any]]  # ROME-form edit requests (one, or several for MQuAKE)
    fields: Dict[str, Any]  # normalised evaluation fields; which ones depends on the family


@dataclass
class EditDataset:
    path: str
    schema: str
    cases: List[EditCase] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # errors of the records left out (skip_bad_records)

    @property
    def family(self) -> str:
        return SCHEMA_FAMILY[self.schema]

    def __len__(self) -> int:
        return len(self.cases)

    def take(self, n: int) -> List[EditCase]:
        """The first ``n`` cases; an error naming the file if it has fewer."""
        if n < 1:
            raise DatasetError(f"{self.path}: asked for {n} edits; need at least 1")
        if n > len(self.cases):
            holder = "the files hold" if " + " in self.path else "the file has"
            raise DatasetError(f"{self.path}: {n} edits requested but {holder} only {len(self.cases)} records "
                               f"(schema {self.schema}); lower --edits to at most {len(self.cases)}")
        return self.cases[:n]


# ---------------------------------------------------------------------------
# Field access with located errors
# ---------------------------------------------------------------------------

class _Record:
    def __init__(self, path: str, index: int, record: Any, schema: str):
        self.path, self.index, self.record, self.schema = path, index, record, schema
        if not isinstance(record, dict):
            self.fail("", f"expected a JSON object, got {type(record).__name__}")

    def where(self, name: str) -> str:
        case = self.record.get("case_id") if isinstance(self.record, dict) else None
        label = f"record {self.index}" + (f" (case_id {case})" if case is not None else "")
        return f"{self.path}: {label}" + (f", field {name!r}" if name else "")

    def fail(self, name: str, message: str):
        raise DatasetError(f"{self.where(name)}: {message} (schema {self.schema})")

    def get(self, name: str, kind: Union[type, tuple] = None, obj: Any = None, required: bool = True,
            nonempty: bool = True, default: Any = None) -> Any:
        """``obj[name]`` (obj defaults to the record); ``name`` may be dotted for the message only."""
        source = self.record if obj is None else obj
        key = name.rsplit(".", 1)[-1].split("[")[0]
        if not isinstance(source, dict) or key not in source:
            if required:
                self.fail(name, "missing")
            return default
        value = source[key]
        if kind is not None and not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(name, f"expected {names}, got {type(value).__name__} {str(value)[:60]!r}")
        if nonempty and isinstance(value, (str, list, dict)) and not (value.strip() if isinstance(value, str) else value):
            self.fail(name, "is empty")
        return value

    def text(self, name: str, obj: Any = None, required: bool = True) -> Optional[str]:
        return self.get(name, str, obj, required=required)

    def answer_str(self, name: str, obj: Any = None) -> str:
        """A string, or a ROME-style {"str": ...} object."""
        value = self.get(name, (str, dict), obj)
        if isinstance(value, dict):
            value = self.get(f"{name}.str", str, value)
        return value

    def request(self, template: str, subject: str, target: str, name: str) -> Dict[str, Any]:
        """A ROME-form request; the subject must occur in the prompt (or the prompt holds ``{}``)."""
        if "{}" not in template:
            if subject not in template:
                self.fail(name, f"the subject {subject!r} does not occur in the prompt {template!r}")
            at = template.index(subject)
            template = template[:at] + "{}" + template[at + len(subject):]
        elif template.count("{}") != 1:
            self.fail(name, f"the prompt {template!r} has {template.count('{}')} '{{}}' placeholders; expected one")
        return {"prompt": template, "subject": subject, "target_new": {"str": target},
                "case_id": self.record.get("case_id", self.index)}


def normalise_answers(raw: Any) -> List[List[str]]:
    """A ground truth as a list of answers, each a list of accepted aliases.

    KnowEdit writes ground truths in three shapes: ``"Paris"``,
    ``["Paris", "City of Light"]`` (aliases of one answer) and
    ``[["Paris", ...], ["Lyon", ...]]`` (several answers, each with aliases;
    wiki_recent). All become ``[[alias, ...], ...]``.
    """
    if isinstance(raw, str):
        return [[raw]] if raw.strip() else []
    if isinstance(raw, (list, tuple)):
        if all(isinstance(x, str) for x in raw):
            aliases = [x for x in raw if x.strip()]
            return [aliases] if aliases else []
        result = []
        for item in raw:
            result += normalise_answers(item)
        return result
    raise TypeError(f"expected a string or a (nested) list of strings, got {type(raw).__name__}")


# ---------------------------------------------------------------------------
# One parser per schema
# ---------------------------------------------------------------------------

def _counterfact_flat(r: _Record) -> EditCase:
    subject, prompt = r.text("subject"), r.text("prompt")
    target_new, target_true = r.answer_str("target_new"), r.answer_str("ground_truth")
    return EditCase(r.index, r.record.get("case_id", r.index), [r.request(prompt, subject, target_new, "prompt")], {
        "prompt": prompt.replace("{}", subject), "target_new": target_new, "target_true": target_true,
        "paraphrases": [r.text("rephrase_prompt")],
        "neighbourhood": [(r.text("locality_prompt"), r.answer_str("locality_ground_truth"))],
        "generation_prompts": [], "subject": subject,
    })


def _rome_rewrite(r: _Record, rewrite: Any, name: str):
    if not isinstance(rewrite, dict):
        r.fail(name, f"expected an object, got {type(rewrite).__name__}")
    subject = r.text(f"{name}.subject", rewrite)
    template = r.text(f"{name}.prompt", rewrite)
    target_new = r.answer_str(f"{name}.target_new", rewrite)
    target_true = r.answer_str(f"{name}.target_true", rewrite) if "target_true" in rewrite else None
    return subject, template, target_new, target_true


def _counterfact_rome(r: _Record) -> EditCase:
    subject, template, target_new, target_true = _rome_rewrite(r, r.get("requested_rewrite", dict), "requested_rewrite")
    if target_true is None:
        r.fail("requested_rewrite.target_true", "missing")
    paraphrases = r.get("paraphrase_prompts", list)
    neighbourhood = r.get("neighborhood_prompts", list)
    for name, values in (("paraphrase_prompts", paraphrases), ("neighborhood_prompts", neighbourhood)):
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                r.fail(f"{name}[{i}]", f"expected a non-empty string, got {v!r}")
    rewrite = r.record["requested_rewrite"]
    return EditCase(r.index, r.record.get("case_id", r.index),
                    [r.request(template, subject, target_new, "requested_rewrite.prompt")], {
        "prompt": template.format(subject) if "{}" in template else template,
        "target_new": target_new, "target_true": target_true,
        "paraphrases": list(paraphrases), "neighbourhood": [(p, target_true) for p in neighbourhood],
        "generation_prompts": list(r.get("generation_prompts", list, required=False, nonempty=False, default=[])),
        "subject": subject, "relation_id": rewrite.get("relation_id"),
        "target_new_id": rewrite["target_new"].get("id") if isinstance(rewrite["target_new"], dict) else None,
    })


def _zsre_mend(r: _Record) -> EditCase:
    subject, src, alt = r.text("subject"), r.text("src"), r.answer_str("alt")
    answers = r.get("answers", list, required=False, nonempty=False, default=[])
    return EditCase(r.index, r.record.get("case_id", r.index), [r.request(src, subject, alt, "src")], {
        "prompt": src, "target_new": alt, "rephrase": r.text("rephrase"),
        "loc": r.text("loc"), "loc_ans": r.answer_str("loc_ans"),
        "target_true": answers[0] if answers and isinstance(answers[0], str) else None, "subject": subject,
    })


def _probes(r: _Record, name: str) -> Dict[str, List[Dict[str, Any]]]:
    """KnowEdit locality / portability: {kind: [{prompt, answers}]} (also accepts one object instead of a list)."""
    raw = r.get(name, dict, required=False, nonempty=False, default={})
    result = {}
    for kind, items in raw.items():
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            r.fail(f"{name}.{kind}", f"expected a list of {{prompt, ground_truth}}, got {type(items).__name__}")
        probes = []
        for i, item in enumerate(items):
            where = f"{name}.{kind}[{i}]"
            if not isinstance(item, dict):
                r.fail(where, f"expected an object with prompt and ground_truth, got {type(item).__name__}")
            prompt = item.get("prompt")
            prompts = prompt if isinstance(prompt, list) else [prompt]
            truth = item.get("ground_truth")
            if truth is None:
                r.fail(f"{where}.ground_truth", "missing")
            try:
                answers = normalise_answers(truth)
            except TypeError as error:
                r.fail(f"{where}.ground_truth", str(error))
            if not answers:
                r.fail(f"{where}.ground_truth", "is empty")
            for p in prompts:
                if not isinstance(p, str) or not p.strip():
                    r.fail(f"{where}.prompt", f"expected a non-empty string, got {p!r}")
                probes.append({"prompt": p, "answers": answers})
        result[kind] = probes
    return result


def _knowedit(r: _Record) -> EditCase:
    subject, prompt, target_new = r.text("subject"), r.text("prompt"), r.answer_str("target_new")
    truth = r.record.get("ground_truth")
    try:
        ground_truth = normalise_answers(truth) if truth is not None else []
    except TypeError as error:
        r.fail("ground_truth", str(error))
    rephrase = r.record.get("rephrase_prompt")
    return EditCase(r.index, r.record.get("case_id", r.index), [r.request(prompt, subject, target_new, "prompt")], {
        "prompt": prompt, "target_new": target_new, "ground_truth": ground_truth,
        "rephrase": rephrase if isinstance(rephrase, str) and rephrase.strip() else None,
        "locality": _probes(r, "locality"), "portability": _probes(r, "portability"), "subject": subject,
    })


def _knowedit_wikibio(r: _Record) -> EditCase:
    text, labels, concept = r.text("text"), r.text("labels"), r.text("concept")
    return EditCase(r.index, r.record.get("case_id", r.index), [r.request(text, concept, labels, "text")], {
        "prompt": text, "target_new": labels, "ground_truth": [], "rephrase": None,
        "locality": _probes(r, "locality"), "portability": {}, "subject": concept,
    })


def _hops(r: _Record, name: str) -> List[Dict[str, Any]]:
    hops = r.get(name, list, required=False, nonempty=False, default=[])
    result = []
    for i, hop in enumerate(hops):
        where = f"{name}[{i}]"
        if not isinstance(hop, dict):
            r.fail(where, "expected an object")
        answer = r.text(f"{where}.answer", hop)
        aliases = hop.get("answer_alias") or []
        result.append({"question": r.text(f"{where}.question", hop), "cloze": hop.get("cloze"),
                       "answers": [answer] + [a for a in aliases if isinstance(a, str) and a.strip()]})
    return result


def _mquake(r: _Record) -> EditCase:
    rewrites = r.get("requested_rewrite", list)
    requests = []
    for i, rewrite in enumerate(rewrites):
        subject, template, target_new, _ = _rome_rewrite(r, rewrite, f"requested_rewrite[{i}]")
        requests.append(r.request(template, subject, target_new, f"requested_rewrite[{i}].prompt"))
    questions = r.get("questions", list)
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            r.fail(f"questions[{i}]", f"expected a non-empty string, got {q!r}")
    new_answer = r.text("new_answer")
    aliases = r.get("new_answer_alias", list, required=False, nonempty=False, default=[])
    old = r.record.get("answer")
    old_aliases = r.record.get("answer_alias") or []
    return EditCase(r.index, r.record.get("case_id", r.index), requests, {
        "questions": list(questions),
        "new_answers": [new_answer] + [a for a in aliases if isinstance(a, str) and a.strip()],
        "old_answers": ([old] if isinstance(old, str) else []) + [a for a in old_aliases if isinstance(a, str)],
        "new_single_hops": _hops(r, "new_single_hops"),
    })


def _coupled(r: _Record) -> Dict[str, Any]:
    coupled = r.get("coupled_prompts_and_properties", dict)
    subject_entity = r.get("coupled_prompts_and_properties.subject_entity", dict, coupled)
    entities = r.get("coupled_prompts_and_properties.coupled_entities", list, coupled)

    def facts(name: str, raw: Any) -> List[str]:
        if not isinstance(raw, dict):
            r.fail(name, f"expected an object {{property: [values]}}, got {type(raw).__name__}")
        return [v for values in raw.values() for v in (values if isinstance(values, list) else [values])
                if isinstance(v, str) and v.strip()]

    subject_prompt = r.text("coupled_prompts_and_properties.subject_entity.coupled_prompt", subject_entity)
    subject_truth = facts("coupled_prompts_and_properties.subject_entity.ground_truth",
                          r.get("coupled_prompts_and_properties.subject_entity.ground_truth", dict, subject_entity))
    related = []
    for i, entity in enumerate(entities):
        where = f"coupled_prompts_and_properties.coupled_entities[{i}]"
        if not isinstance(entity, dict):
            r.fail(where, "expected an object")
        name = r.text(f"{where}.entity", entity)
        key = "ground_truth" if "ground_truth" in entity else "overlapping_ground_truth"
        truth = facts(f"{where}.{key}", r.get(f"{where}.{key}", dict, entity, nonempty=False))
        related.append({"entity": name, "coupled_prompt": entity.get("coupled_prompt"), "facts": truth})
    if not related:
        r.fail("coupled_prompts_and_properties.coupled_entities", "is empty")
    return {"subject_prompt": subject_prompt, "subject_facts": subject_truth, "related": related}


def _leme_counterfact(r: _Record) -> EditCase:
    case = _counterfact_rome(r)
    case.fields.update(_coupled(r))
    return case


def _leme_zsre(r: _Record) -> EditCase:
    case = _zsre_mend(r)
    case.fields.update({"target_true": case.fields["target_true"]})
    case.fields.update(_coupled(r))
    return case


PARSERS: Dict[str, Callable[[_Record], EditCase]] = {
    "counterfact_flat": _counterfact_flat,
    "counterfact_rome": _counterfact_rome,
    "zsre_mend": _zsre_mend,
    "knowedit": _knowedit,
    "knowedit_wikibio": _knowedit_wikibio,
    "mquake": _mquake,
    "leme_counterfact": _leme_counterfact,
    "leme_zsre": _leme_zsre,
}


def detect_schema(record: Any) -> Optional[str]:
    """The schema of one record, from its keys; None if no known schema fits."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    coupled = "coupled_prompts_and_properties" in keys
    rewrite = record.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "mquake"
    if isinstance(rewrite, dict):
        return "leme_counterfact" if coupled else "counterfact_rome"
    if {"src", "alt"} <= keys:
        return "leme_zsre" if coupled else "zsre_mend"
    if {"text", "labels", "concept"} <= keys:
        return "knowedit_wikibio"
    if {"prompt", "target_new"} <= keys and ("locality_prompt" in keys or "rephrase_prompt" in keys) \
            and not isinstance(record.get("locality"), dict):
        return "counterfact_flat"
    if {"prompt", "target_new"} <= keys and (isinstance(record.get("locality"), dict)
                                             or isinstance(record.get("portability"), dict)):
        return "knowedit"
    return None


def parse_records(records: Sequence[Any], schema: str, source: str = "records") -> List[EditCase]:
    """Records already in memory (a list of dicts in ``schema``) as cases; the first bad one raises DatasetError."""
    if schema not in PARSERS:
        raise DatasetError(f"unknown schema {schema!r}; known: {', '.join(sorted(PARSERS))}")
    return [PARSERS[schema](_Record(source, i, record, schema)) for i, record in enumerate(records)]


def load_dataset(path: Union[str, Path], schema: Optional[str] = None, family: Optional[str] = None,
                 skip_bad_records: bool = False) -> EditDataset:
    """Read a benchmark file (JSON list, or JSON Lines) into :class:`EditDataset`.

    ``schema`` forces a schema; ``family`` (counterfact, zsre, knowedit, mquake,
    leme) checks that the detected schema belongs to it. Every record is
    checked; the first problem raises :class:`DatasetError` naming the file,
    the record and the field. With ``skip_bad_records`` such records are
    left out instead (each one logged, and listed in ``EditDataset.skipped``):
    real files have a few, e.g. an empty ``alt`` in zsRE.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file; pass the path of a benchmark JSON file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; pass the path of one benchmark JSON file inside it")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty; expected a JSON list of records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            data = [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise DatasetError(f"{path}: not valid JSON (nor JSON Lines): {error}") from None
    if isinstance(data, dict):
        raise DatasetError(f"{path}: unknown schema: the file holds a JSON object with keys "
                           f"{sorted(data)[:8]}; expected a list of records in one of {sorted(PARSERS)}")
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise DatasetError(f"{path}: the file holds no records (an empty list)")
    if schema is None:
        schema = detect_schema(data[0])
        if schema is None:
            keys = sorted(data[0]) if isinstance(data[0], dict) else type(data[0]).__name__
            raise DatasetError(f"{path}: record 0: unknown schema (fields {keys}); known schemas: "
                               f"{', '.join(sorted(PARSERS))} (see alphaedit_plugin/evaluation/datasets.py)")
    elif schema not in PARSERS:
        raise DatasetError(f"unknown schema {schema!r}; known: {', '.join(sorted(PARSERS))}")
    if family is not None and SCHEMA_FAMILY[schema] != family:
        raise DatasetError(f"{path}: the file is in schema {schema} (family {SCHEMA_FAMILY[schema]}), "
                           f"not a {family} dataset")
    parser = PARSERS[schema]
    cases, skipped = [], []
    for i, record in enumerate(data):
        try:
            cases.append(parser(_Record(str(path), i, record, schema)))
        except DatasetError as error:
            if not skip_bad_records:
                raise
            logger.warning("skipping: %s", error)
            skipped.append(str(error))
    if not cases:
        raise DatasetError(f"{path}: none of its {len(data)} records is usable (first problem: {skipped[0]})")
    return EditDataset(path=str(path), schema=schema, cases=cases, skipped=skipped)


def load_datasets(paths: Sequence[Union[str, Path]], schema: Optional[str] = None, family: Optional[str] = None,
                  skip_bad_records: bool = False) -> EditDataset:
    """Several benchmark files of one schema as one data set, their cases in the order given (a run longer than
    any one file: MEND's ZsRE comes as a 1,000-record and a 1,037-record file). A case's ``index`` is then its
    position in the concatenation; ``path`` lists the files joined by `` + ``. The same edit (prompt, subject and
    new target) in two of the files is refused: it would be edited twice. One path: :func:`load_dataset`."""
    if not paths:
        raise DatasetError("no benchmark file given")
    parts = [load_dataset(p, schema=schema, family=family, skip_bad_records=skip_bad_records) for p in paths]
    if len(parts) == 1:
        return parts[0]
    schemas = {part.path: part.schema for part in parts}
    if len(set(schemas.values())) > 1:
        raise DatasetError("the benchmark files are of different schemas ("
                           + ", ".join(f"{p}: {s}" for p, s in schemas.items()) + "); give files of one schema")
    seen: Dict[tuple, str] = {}
    cases: List[EditCase] = []
    for part in parts:
        for case in part.cases:
            for request in case.requests:
                key = (request["prompt"], request["subject"], request["target_new"]["str"])
                if key in seen:
                    raise DatasetError(f"{part.path}: record {case.index} edits {request['subject']!r} to "
                                       f"{key[2]!r} as {seen[key]} does already; give files without shared "
                                       "records")
                seen[key] = f"{part.path} record {case.index}"
            cases.append(dataclasses.replace(case, index=len(cases)))
    return EditDataset(path=" + ".join(part.path for part in parts), schema=parts[0].schema, cases=cases,
                       skipped=[s for part in parts for s in part.skipped])
