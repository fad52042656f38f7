"""Edit requests: one normalised form for EasyEdit's and ROME's request dicts.

EasyEdit passes ``{"prompt": "The capital of France is", "subject": "France",
"target_new": "Rome"}``; ROME/MEMIT data uses ``{"prompt": "The capital of {}
is", "subject": "France", "target_new": {"str": "Rome"}}``. Both become an
:class:`EditRequest`. The caller's dicts are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional


class RequestError(ValueError):
    pass


@dataclass(frozen=True)
class EditRequest:
    prompt_template: str  # contains exactly one "{}" where the subject goes
    subject: str
    target: str  # with a leading space, as it follows the prompt
    case_id: Optional[Any] = None

    @property
    def prompt(self) -> str:
        return self.prompt_template.format(self.subject)

    def as_dict(self) -> dict:
        return {"prompt": self.prompt_template, "subject": self.subject, "target_new": {"str": self.target},
                "case_id": self.case_id}


def _target_string(raw: Any, index: int) -> str:
    if isinstance(raw, Mapping):
        if "str" not in raw:
            raise RequestError(f"request {index}: field 'target_new' is a dict without 'str'; expected a string or {{'str': ...}}")
        raw = raw["str"]
    if not isinstance(raw, str):
        raise RequestError(f"request {index}: field 'target_new' must be a string, got {type(raw).__name__}")
    if not raw.strip():
        raise RequestError(f"request {index}: field 'target_new' is empty; expected the new answer, e.g. 'Rome'")
    return raw if raw.startswith(" ") else " " + raw


def normalise_request(raw: Mapping, index: int = 0) -> EditRequest:
    if isinstance(raw, EditRequest):
        return raw
    if not isinstance(raw, Mapping):
        raise RequestError(f"request {index}: expected a dict with prompt, subject and target_new, got {type(raw).__name__}")
    for name in ("prompt", "subject", "target_new"):
        if name not in raw:
            raise RequestError(f"request {index}: missing field {name!r} (needed: prompt, subject, target_new)")
    prompt, subject = raw["prompt"], raw["subject"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"request {index}: field 'prompt' must be a non-empty string, got {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise RequestError(f"request {index}: field 'subject' must be a non-empty string, got {subject!r}")
    target = _target_string(raw["target_new"], index)
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise RequestError(f"request {index}: field 'prompt' has {prompt.count('{}')} '{{}}' placeholders; expected one")
        template = prompt
    elif subject in prompt:
        at = prompt.index(subject)
        template = prompt[:at] + "{}" + prompt[at + len(subject):]
    else:
        raise RequestError(
            f"request {index}: subject {subject!r} not found in prompt {prompt!r}; "
            "the subject must appear in the prompt (or the prompt must hold '{}' for it)"
        )
    # Braces elsewhere in the prompt would break str.format; escape them.
    before, after = template.split("{}")
    template = _escape(before) + "{}" + _escape(after)
    return EditRequest(prompt_template=template, subject=subject, target=target, case_id=raw.get("case_id"))


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def normalise_requests(requests: Iterable[Mapping]) -> List[EditRequest]:
    if isinstance(requests, Mapping):
        requests = [requests]
    result = [normalise_request(raw, i) for i, raw in enumerate(requests)]
    if not result:
        raise RequestError("no requests given; expected at least one edit request")
    seen = {}
    for index, request in enumerate(result):
        first = seen.setdefault((request.prompt_template, request.subject), index)
        if first != index and result[first].target != request.target:
            raise RequestError(f"requests {first} and {index} ask the same prompt {request.prompt!r} (subject "
                               f"{request.subject!r}) for different targets {result[first].target.strip()!r} and "
                               f"{request.target.strip()!r}; one batch cannot hold both")
    return result
