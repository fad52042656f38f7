"""Text corpora for the second-moment statistics K0K0ᵀ.

``mom2_dataset`` names one of:

- a local text file or a folder of them (``.txt``, ``.raw``, ``.text``,
  ``.md``, or ``.jsonl`` with a ``text`` field): one sample per non-empty
  paragraph line, headings (``= Title =``) skipped, as in WikiText;
- a local ``.parquet`` file or a folder holding them, in the layout of the
  hub's ``wikimedia/wikipedia`` (``20231101.en/train-00000-of-00041.parquet``,
  columns ``id``, ``url``, ``title``, ``text``): one sample per row's ``text``,
  files in name order, read through the optional ``datasets`` package;
- ``self``: text sampled from the model itself with a fixed seed, so that the
  package works offline on any model;
- ``wikipedia`` (what EasyEdit's yaml files say) or ``wikimedia/wikipedia``:
  the English Wikipedia dump ``20231101.en`` of the hub's ``wikimedia/wikipedia``,
  streamed; ``wikimedia/wikipedia:20231101.de`` picks another of its configs;
- any other name, ``name`` or ``name:config``: a datasets-hub corpus (split
  ``train``, its ``text`` column), streamed.

Hub and parquet corpora give one sample per article: its text, cut to
``mom2_max_tokens`` tokens, the first ``mom2_n_samples`` articles in stream
order (deterministic), as the paper's statistics took Wikipedia articles.
They need the ``datasets`` package (``pip install alphaedit-plugin[wikipedia]``).

:func:`corpus_identity` is cheap and goes into cache keys;
:func:`corpus_token_sequences` does the work and is only called on a miss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

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
PARQUET_SUFFIX = ".parquet"

WIKIPEDIA = "wikimedia/wikipedia"  # the hub's Wikipedia, one config per dump and language
WIKIPEDIA_DUMP = "20231101"
WIKIPEDIA_CONFIG = f"{WIKIPEDIA_DUMP}.en"
LEGACY_WIKIPEDIA = "wikipedia"  # EasyEdit's yaml files; its 20220301.* configs are no longer served
HUB_SPLIT = "train"
TEXT_COLUMN = "text"
INSTALL_HINT = "pip install 'alphaedit-plugin[wikipedia]' (or pip install datasets)"
# An article is tokenised from a prefix of at most this many characters per wanted token (cut at a whitespace),
# not whole: the first mom2_max_tokens tokens come out the same, and a long article costs little more than a short one.
HEAD_CHARS_PER_TOKEN = 16
_WHITESPACE = re.compile(r"\s")


class CorpusError(ValueError):
    pass


def _local_files(path: Path) -> List[Path]:
    """The corpus files of a local ``mom2_dataset``, in name order: the file itself; or a folder's parquet files
    where it holds any (a folder of ``wikimedia/wikipedia`` shards, whatever else lies there), else its text
    files."""
    if path.is_file():
        return [path]
    parquet = sorted(p for p in path.rglob(f"*{PARQUET_SUFFIX}") if p.is_file())
    if parquet:
        return parquet
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
    if not files:
        raise CorpusError(f"mom2_dataset folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}, .jsonl) "
                          f"and no {PARQUET_SUFFIX} files")
    return files


def _is_parquet(files: List[Path]) -> bool:
    return files[0].suffix == PARQUET_SUFFIX


def _is_local(spec: str) -> bool:
    return (Path(spec).expanduser().exists() or spec.startswith((".", "/", "~"))
            or spec.endswith(TEXT_SUFFIXES + (PARQUET_SUFFIX,)))


@dataclass(frozen=True)
class HubCorpus:
    """A datasets-hub corpus: ``load_dataset(dataset, config, split=split, streaming=True)``."""

    dataset: str
    config: Optional[str]
    split: str = HUB_SPLIT

    @property
    def name(self) -> str:
        return f"{self.dataset}:{self.config}" if self.config else self.dataset


_legacy_noted: set = set()


def hub_corpus(spec: str) -> HubCorpus:
    """What a hub ``mom2_dataset`` (``name`` or ``name:config``) reads.

    ``wikimedia/wikipedia`` alone is its English dump ``20231101.en``. The old ``wikipedia`` of EasyEdit's yaml
    files (``load_dataset("wikipedia", "20220301.en")``, which current ``datasets`` no longer serves), with or
    without a config, is read as ``wikimedia/wikipedia`` 20231101 in the same language, with a note, once.
    """
    name, _, config = spec.partition(":")
    name, config = name.strip(), config.strip() or None
    if name == LEGACY_WIKIPEDIA:
        language = config.rsplit(".", 1)[-1] if config else "en"
        corpus = HubCorpus(WIKIPEDIA, f"{WIKIPEDIA_DUMP}.{language}")
        if spec not in _legacy_noted:
            _legacy_noted.add(spec)
            logger.warning("mom2_dataset %r: the hub's old 'wikipedia' dataset (%s) is no longer served by "
                           "datasets; reading %s config %s instead (set mom2_dataset: %s to say so)", spec,
                           config or "20220301.en", corpus.dataset, corpus.config, corpus.name)
        return corpus
    if name == WIKIPEDIA and config is None:
        config = WIKIPEDIA_CONFIG
    return HubCorpus(name, config)


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
    # The number of samples is in the callers' keys (n_samples / mom2_n_samples) next to this.
    corpus = hub_corpus(spec)
    return {"corpus": f"hub:{corpus.name}", "dataset": corpus.dataset, "config": corpus.config,
            "split": corpus.split, "max_tokens": max_tokens}


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


def _load_dataset_function(spec: str):
    """``datasets.load_dataset``, or a clear error where the optional package is missing."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise CorpusError(f"mom2_dataset {spec!r} is read through the 'datasets' package, which is not installed: "
                          f"{INSTALL_HINT}; or point mom2_dataset at a local text file or folder, or use "
                          "'self'") from error
    return load_dataset


def _record_texts(spec: str, records: Iterable[dict], source: str) -> Iterator[str]:
    """The non-empty ``text`` of each record, in order."""
    for record in records:
        if TEXT_COLUMN not in record:
            raise CorpusError(f"mom2_dataset {spec!r}: {source} has no {TEXT_COLUMN!r} column (columns: "
                              f"{', '.join(map(str, record))}); a corpus of articles needs one")
        text = record[TEXT_COLUMN]
        if isinstance(text, str) and text.strip():
            yield text


def _parquet_texts(spec: str, files: List[Path]) -> Iterator[str]:
    load_dataset = _load_dataset_function(spec)
    names = [str(file) for file in files]
    logger.info("mom2_dataset %s: streaming %d parquet file(s) through datasets (%s%s)", spec, len(files),
                files[0].name, f" … {files[-1].name}" if len(files) > 1 else "")
    try:
        stream = load_dataset("parquet", data_files=names, split=HUB_SPLIT, streaming=True)
        yield from _record_texts(spec, stream, "the parquet data")
    except CorpusError:
        raise
    except Exception as error:
        raise CorpusError(f"mom2_dataset {spec!r}: its parquet files could not be read ({type(error).__name__}: "
                          f"{error}); expected files like {WIKIPEDIA_CONFIG}/train-00000-of-00041.parquet with a "
                          f"{TEXT_COLUMN!r} column") from error


def _offline_mode() -> bool:
    try:
        from datasets import config
        return bool(config.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - only for the wording of an error
        return False


def _how_to_get(corpus: HubCorpus) -> str:
    advice = ("either run once with network access, loading it in full to cache it "
              f"(datasets.load_dataset({corpus.dataset!r}, {corpus.config!r}); streamed reads are not cached), "
              "or download its parquet files and point mom2_dataset at their folder")
    if corpus.dataset == WIKIPEDIA:
        advice += (f", e.g. hf download {WIKIPEDIA} --repo-type dataset --include "
                   f"'{corpus.config}/train-0000[0-1]-*' --local-dir wikipedia (the first shards: the articles "
                   f"the stream reads first), then mom2_dataset: wikipedia/{corpus.config}")
    return advice


def _hub_texts(spec: str) -> Iterator[str]:
    corpus = hub_corpus(spec)
    load_dataset = _load_dataset_function(spec)
    logger.info("mom2_dataset %s: streaming %s (config %s, split %s) from the datasets hub", spec, corpus.dataset,
                corpus.config, corpus.split)
    try:
        stream = load_dataset(corpus.dataset, corpus.config, split=corpus.split, streaming=True)
        yield from _record_texts(spec, stream, f"hub dataset {corpus.name}")
    except CorpusError:
        raise
    except ConnectionError as error:  # datasets 4: "Couldn't reach '…' on the Hub (OfflineModeIsEnabled)"
        why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline_mode()
               else "the hub cannot be reached")
        raise CorpusError(f"mom2_dataset {spec!r} needs the hub dataset {corpus.dataset} (config {corpus.config}, "
                          f"split {corpus.split}), which is not in the local datasets cache, and {why} "
                          f"({type(error).__name__}: {error}); {_how_to_get(corpus)}") from error
    except Exception as error:
        raise CorpusError(f"mom2_dataset {spec!r}: the hub dataset {corpus.dataset} (config {corpus.config}, split "
                          f"{corpus.split}) could not be loaded ({type(error).__name__}: {error}); where there is "
                          f"no network, {_how_to_get(corpus)}; or use a local text corpus or 'self'") from error


def _head(text: str, max_tokens: int) -> str:
    """A prefix of ``text`` long enough for its first ``max_tokens`` tokens: the text up to the first whitespace
    after ``HEAD_CHARS_PER_TOKEN`` characters per token (the whole text where it is shorter or has none)."""
    budget = max_tokens * HEAD_CHARS_PER_TOKEN
    if len(text) <= budget:
        return text
    space = _WHITESPACE.search(text, budget)
    return text if space is None else text[:space.start()]


def _truncated_ids(tok, text: str, max_tokens: int) -> List[int]:
    head = _head(text, max_tokens)
    ids = encode(tok, head)
    if head is not text and len(ids) <= max_tokens:  # tokens longer than the budget allows: the whole text
        ids = encode(tok, text)
    return ids[:max_tokens]


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
    shortest = "article of at least 2 tokens"
    if _is_local(spec):
        files = _local_files(Path(spec).expanduser())
        if _is_parquet(files):
            texts = _parquet_texts(spec, files)
        else:
            texts, shortest = _paragraphs(files), f"text of at least {MIN_PARAGRAPH_CHARS} characters"
    else:
        texts = _hub_texts(spec)
    sequences = []
    with tqdm(total=n_samples, desc="reading corpus", unit="text") as progress:
        try:
            for text in texts:
                ids = _truncated_ids(tok, text, max_tokens)
                if len(ids) >= 2:
                    sequences.append(ids)
                    progress.update()
                    if len(sequences) >= n_samples:
                        break
        finally:
            texts.close()  # a stream stops here, at n_samples
    if not sequences:
        raise CorpusError(f"mom2_dataset {spec!r} yielded no {shortest}")
    logger.info("corpus %s: %d texts, %d tokens", spec, len(sequences), sum(map(len, sequences)))
    return sequences
