"""Text corpora for the second-moment statistics K0K0ᵀ.

``mom2_dataset`` names one of:

- a local text file or a folder of them (``.txt``, ``.raw``, ``.text``,
  ``.md``, or ``.jsonl`` with a ``text`` field): one sample per non-empty
  paragraph line, headings (``= Title =``) skipped, as in WikiText;
- ``self``: text sampled from the model itself with a fixed seed, so that the
  package works offline on any model;
- any other name: a datasets-hub corpus, where the ``datasets`` package and a
  network are available (the paper used Wikipedia).

:func:`corpus_identity` is cheap and goes into cache keys;
:func:`corpus_token_sequences` does the work and is only called on a miss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from tqdm.auto import tqdm

from .tracing import encode, pad_token_id

logger = logging.getLogger(__name__)

SELF = "self"
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")
SELF_START_WORDS = ("The", "In", "A", "This", "It", "He", "She", "When", "After", "Many", "There", "One",
                    "During", "His", "Her", "According")
SELF_BATCH = 128
MIN_PARAGRAPH_CHARS = 40


class CorpusError(ValueError):
    pass


def _local_files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
    if not files:
        raise CorpusError(f"mom2_dataset folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}, .jsonl)")
    return files


def _is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.endswith(TEXT_SUFFIXES)


def corpus_identity(spec: str, max_tokens: int, seed: int) -> Dict[str, object]:
    """What the statistics depend on, besides the model: the corpus, by content."""
    if spec == SELF:
        return {"corpus": SELF, "seed": seed, "max_tokens": max_tokens}
    if _is_local(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise CorpusError(f"mom2_dataset {spec!r} is not an existing file or folder; give a path to a text "
                              "corpus (e.g. ../shared/data/wikitext/wiki.test.raw), 'self' or a hub name")
        versions = tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in _local_files(path))
        return {"corpus": f"file:{path.name}", "sha256": _files_digest(versions), "max_tokens": max_tokens}
    return {"corpus": f"hub:{spec}", "max_tokens": max_tokens}


@functools.lru_cache(maxsize=16)
def _files_digest(versions: tuple) -> str:
    """The corpus files' content hash, read once per version of the files (the state's identity asks for it at
    every edit, and a corpus can be large)."""
    sha = hashlib.sha256()
    for name, _, _ in versions:
        file = Path(name)
        sha.update(file.name.encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()[:16]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = file.read_bytes()[:error.start].count(b"\n") + 1
        raise CorpusError(f"mom2_dataset file {file}: line {line} is not UTF-8 text (byte {error.start}); give a "
                          "UTF-8 text corpus") from None


def _paragraphs(files: List[Path]) -> Iterator[str]:
    for file in files:
        if file.suffix == ".jsonl":
            for number, line in enumerate(_read_text(file).splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise CorpusError(f"mom2_dataset file {file}: line {number} is not valid JSON ({error.msg}); "
                                          "expected one object with a 'text' field per line") from None
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise CorpusError(f"mom2_dataset file {file}: line {number} has no string 'text' field")
                    if len(text.strip()) >= MIN_PARAGRAPH_CHARS:
                        yield text.strip()
            continue
        for line in _read_text(file).splitlines():
            line = line.strip()
            if len(line) >= MIN_PARAGRAPH_CHARS and not (line.startswith("=") and line.endswith("=")):
                yield line


def _hub_texts(spec: str, n_samples: int) -> Iterator[str]:
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise CorpusError(f"mom2_dataset {spec!r} is a hub name, but the 'datasets' package is not installed; "
                          "point mom2_dataset at a local text file or folder, or use 'self'") from error
    name, config = (spec, "20220301.en") if spec == "wikipedia" else (spec, None)
    try:
        stream = load_dataset(name, config, split="train", streaming=True)
        for i, record in enumerate(stream):
            if i >= n_samples:
                break
            yield record["text"]
    except Exception as error:
        raise CorpusError(f"mom2_dataset {spec!r} could not be loaded from the hub ({type(error).__name__}: {error}); "
                          "offline, point mom2_dataset at a local text file or folder, or use 'self'") from error


def _self_sequences(model, tok, n_samples: int, max_tokens: int, seed: int) -> List[List[int]]:
    device = next(model.parameters()).device
    sequences: List[List[int]] = []
    batches = (n_samples + SELF_BATCH - 1) // SELF_BATCH
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for batch in tqdm(range(batches), desc="sampling self corpus", unit="batch"):
            count = min(SELF_BATCH, n_samples - batch * SELF_BATCH)
            start = encode(tok, SELF_START_WORDS[batch % len(SELF_START_WORDS)])
            input_ids = torch.tensor([start] * count, device=device)
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                    top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_tokens - len(start),
                                    pad_token_id=pad_token_id(tok))
            eos = getattr(tok, "eos_token_id", None)
            for row in output.tolist():
                if eos is not None and eos in row[len(start):]:
                    row = row[: len(start) + row[len(start):].index(eos) + 1]
                sequences.append(row)
    return sequences


def max_positions(model) -> Optional[int]:
    """The longest sequence the model's positions allow (absolute or rotary), where its config says."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def corpus_token_sequences(spec: str, model, tok, n_samples: int, max_tokens: int, seed: int) -> List[List[int]]:
    """Up to ``n_samples`` token sequences of at most ``max_tokens`` tokens each (and at most the model's
    positions)."""
    limit = max_positions(model)
    if limit is not None and max_tokens > limit:
        logger.info("mom2_max_tokens %d is more than the model's %d positions: corpus texts are cut at %d tokens",
                    max_tokens, limit, limit)
        max_tokens = limit
    if spec == SELF:
        logger.info("sampling %d texts of up to %d tokens from the model itself (mom2_dataset: self)",
                    n_samples, max_tokens)
        return _self_sequences(model, tok, n_samples, max_tokens, seed)
    if _is_local(spec):
        texts = _paragraphs(_local_files(Path(spec).expanduser()))
    else:
        texts = _hub_texts(spec, n_samples)
    sequences = []
    for text in texts:
        if len(sequences) >= n_samples:
            break
        ids = encode(tok, text)[:max_tokens]
        if len(ids) >= 2:
            sequences.append(ids)
    if not sequences:
        raise CorpusError(f"mom2_dataset {spec!r} yielded no text of at least {MIN_PARAGRAPH_CHARS} characters")
    logger.info("corpus %s: %d texts, %d tokens", spec, len(sequences), sum(map(len, sequences)))
    return sequences
