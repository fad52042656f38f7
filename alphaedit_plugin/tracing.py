"""Tokenisation of prompts and forward hooks that read or change activations.

Kept small and explicit: hooks are registered inside context managers and
always removed, so a failed forward pass leaves no hook behind.
"""

from __future__ import annotations

import contextlib
import string
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .architectures import block_output_hidden, get_module, replace_block_output_hidden


def pad_token_id(tok) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    return 0


def encode(tok, text: str, special_tokens: bool = True) -> List[int]:
    return list(tok(text, add_special_tokens=special_tokens)["input_ids"])


def prompt_and_answer_ids(tok, prompt: str, answer: str) -> Tuple[List[int], List[int]]:
    """Token ids of ``prompt`` and of ``answer`` (a leading space added) as they occur in the joint text.

    Tokenising the answer on its own is what the reference code does, and it is exact for byte-level BPE
    (GPT-2, Llama 3, SmolLM2). A SentencePiece tokenizer in legacy mode (Llama 2) turns " Paris" alone into
    "▁" "▁Paris", one token more than the prompt followed by the answer has, and that extra token lowers the
    answer's score. With a fast tokenizer the joint text is tokenised once and split at the prompt's last
    character by the tokens' offsets; where a token straddles that boundary, or offsets are missing, the
    separate tokenisation is used.
    """
    answer = answer if answer.startswith(" ") else " " + answer

    def separate() -> Tuple[List[int], List[int]]:
        return encode(tok, prompt), encode(tok, answer, special_tokens=False)

    if not getattr(tok, "is_fast", False):
        return separate()
    joint = tok(prompt + answer, return_offsets_mapping=True, return_special_tokens_mask=True)
    boundary = len(prompt)
    prompt_ids: List[int] = []
    answer_ids: List[int] = []
    for token, (start, end), special in zip(joint["input_ids"], joint["offset_mapping"],
                                            joint["special_tokens_mask"]):
        if special:
            if not answer_ids:  # leading specials (BOS) belong to the prompt; trailing ones (EOS) are dropped
                prompt_ids.append(token)
        elif end <= boundary and not answer_ids:
            prompt_ids.append(token)
        elif start >= boundary:
            answer_ids.append(token)
        else:
            return separate()  # a token spans the boundary: no clean split
    return (prompt_ids, answer_ids) if answer_ids else separate()


def subject_token_index(tok, prompt_template: str, subject: str, strategy: str) -> Tuple[List[int], int]:
    """Token ids of the filled prompt and the index of the token that represents the subject.

    ``strategy`` is ``subject_last``, ``subject_first`` or ``last``. Positions
    are found from the tokenizer's character offsets where it has them, and
    from the length of the tokenised prefix otherwise.
    """
    text = prompt_template.format(subject)
    ids = encode(tok, text)
    if strategy == "last":
        return ids, len(ids) - 1
    prefix = ""
    for literal, field_name, _, _ in string.Formatter().parse(prompt_template):
        prefix += literal  # unescaped text; parse() splits it at every escaped brace
        if field_name is not None:
            break
    start = len(prefix)
    end = start + len(subject)
    if getattr(tok, "is_fast", False):
        offsets = tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if inside:
            return ids, inside[-1] if strategy == "subject_last" else inside[0]
    if strategy == "subject_last":
        return ids, len(encode(tok, text[:end])) - 1
    return ids, len(encode(tok, text[:start]))  # subject_first: first token after the prefix


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (positions stay absolute)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids.to(device), mask.to(device)


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the first positional input of each named module during forward passes."""
    captured: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(module, args):
            captured[name] = args[0]
        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_pre_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the hidden-state output of each named block during forward passes."""
    captured: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            captured[name] = block_output_hidden(output)
        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edit_output(model: nn.Module, name: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the hidden-state output ``h`` of block ``name`` by ``edit(h)``."""

    def hook(module, args, output):
        return replace_block_output_hidden(output, edit(block_output_hidden(output)))

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def stop_after(model: nn.Module, name: Optional[str]) -> Iterator[Callable]:
    """Abort the forward pass once module ``name`` has run (nothing above it is needed).

    Yields a function ``run(**inputs)`` that calls the model and swallows the stop.
    """
    handle = None
    if name is not None:
        def hook(module, args, output):
            raise _StopForward()
        handle = get_module(model, name).register_forward_hook(hook)

    def run(**inputs):
        try:
            return model(**inputs)
        except _StopForward:
            return None

    try:
        yield run
    finally:
        if handle is not None:
            handle.remove()


_CLASS_FORWARD = object()  # marks a block whose forward is its class's


@contextlib.contextmanager
def replay_blocks(model: nn.Module, names: Sequence[str], outputs: Dict[str, object],
                  replayed_hidden: torch.Tensor) -> Iterator[None]:
    """Skip the computation of blocks ``names`` (the bottom of the stack, in order): each returns its input
    hidden state unchanged, the last returns ``replayed_hidden``, in the output format each returned before
    (``outputs``, one recorded output per block). Their hooks still run.

    For the target search: δ enters at the last of these blocks, so nothing below it changes from step to
    step, and its output can be computed once. The blocks' own forward is put back afterwards.
    """
    blocks = [get_module(model, name) for name in names]
    last = len(blocks) - 1
    own = [block.__dict__.get("forward", _CLASS_FORWARD) for block in blocks]  # accelerate sets its own

    def skipped(index: int, template):
        def forward(*args, **kwargs):
            hidden = replayed_hidden if index == last else (args[0] if args else kwargs["hidden_states"])
            return replace_block_output_hidden(template, hidden)
        return forward

    try:
        for index, (name, block) in enumerate(zip(names, blocks)):
            block.forward = skipped(index, outputs[name])
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is _CLASS_FORWARD:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward


@contextlib.contextmanager
def record_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, object]]:
    """Record the whole output (tensor or tuple) of each named module during forward passes."""
    recorded: Dict[str, object] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            recorded[name] = output
        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
