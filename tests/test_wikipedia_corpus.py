"""Wikipedia statistics corpora: the hub's wikimedia/wikipedia (streamed, through the optional ``datasets``), the
old ``wikipedia`` id of EasyEdit's yaml files, and local parquet files in the same layout. Everything runs offline:
the parquet fixture is written here and the hub is replaced by it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import datasets  # noqa: E402

from conftest import BUILDERS, ROOT, VOCAB, make_hparams, module_inputs  # noqa: E402
from alphaedit_plugin import corpus, create_state  # noqa: E402
from alphaedit_plugin.architectures import templates_for  # noqa: E402
from alphaedit_plugin.corpus import CorpusError, corpus_identity, corpus_token_sequences  # noqa: E402
from alphaedit_plugin.layer_statistics import load_second_moments  # noqa: E402

WORDS = VOCAB[3:]
# Articles of 20..75 words (the last two longer than the 8-token runs' character budget of 128) and one empty one,
# which is skipped.
LENGTHS = [20, 31, 0, 45, 60, 75, 25]
ARTICLES = [" ".join(WORDS[(a * 7 + i) % len(WORDS)] for i in range(n)) for a, n in enumerate(LENGTHS)]
USED = [text for text in ARTICLES if text]
MODEL_STUB = SimpleNamespace(config=SimpleNamespace(n_positions=64))  # what the corpus asks of a model
REAL_LOAD_DATASET = datasets.load_dataset


def write_wikipedia(root, articles=ARTICLES, shards: int = 2):
    """``root/20231101.en/train-0000k-of-0000n.parquet`` with the hub's columns; returns the config folder."""
    folder = root / "20231101.en"
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(articles) // shards)
    for shard in range(shards):
        rows = range(shard * per_shard, min(len(articles), (shard + 1) * per_shard))
        table = pa.table({"id": [str(i + 1) for i in rows],
                          "url": [f"https://en.wikipedia.org/wiki?curid={i + 1}" for i in rows],
                          "title": [f"Article {i + 1}" for i in rows],
                          "text": [articles[i] for i in rows]})
        pq.write_table(table, folder / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return folder


def truncated_ids(tok, texts, max_tokens):
    return [tok(text)["input_ids"][:max_tokens] for text in texts]


@pytest.fixture
def wikipedia(tmp_path):
    return write_wikipedia(tmp_path / "wikipedia")


@pytest.fixture
def calls(monkeypatch):
    """Every ``datasets.load_dataset`` call, passed on to the real one."""
    seen = []

    def recording(*args, **kwargs):
        seen.append((args, kwargs))
        return REAL_LOAD_DATASET(*args, **kwargs)
    monkeypatch.setattr(datasets, "load_dataset", recording)
    return seen


@pytest.fixture
def fake_hub(monkeypatch, wikipedia):
    """The hub's load_dataset, answered from the local parquet fixture; returns the calls it got."""
    seen = []

    def from_fixture(path, name=None, split=None, streaming=False, **kwargs):
        seen.append(((path, name), {"split": split, "streaming": streaming, **kwargs}))
        files = sorted(str(p) for p in wikipedia.glob("*.parquet"))
        return REAL_LOAD_DATASET("parquet", data_files=files, split=split, streaming=streaming)
    monkeypatch.setattr(datasets, "load_dataset", from_fixture)
    monkeypatch.setattr(corpus, "_legacy_noted", set())
    return seen


# ---------------------------------------------------------------------------
# local parquet files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["config folder", "parent folder", "one file"])
def test_parquet_articles_come_through_datasets_in_order_and_truncated(wikipedia, calls, tokenizer, which):
    spec = {"config folder": wikipedia, "parent folder": wikipedia.parent,
            "one file": wikipedia / "train-00000-of-00002.parquet"}[which]
    (wikipedia.parent / "README.md").write_text("# not a corpus file\n" * 5)  # beside the shards: ignored
    expected = USED if which != "one file" else [t for t in ARTICLES[:4] if t]
    sequences = corpus_token_sequences(str(spec), MODEL_STUB, tokenizer, n_samples=100, max_tokens=8, seed=0)
    assert sequences == truncated_ids(tokenizer, expected, 8)
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args == ("parquet",) and kwargs["streaming"] is True and kwargs["split"] == "train"
    assert [os.path.basename(f) for f in kwargs["data_files"]] == sorted(
        p.name for p in (wikipedia.glob("*.parquet") if which != "one file" else [spec]))


def test_the_first_n_samples_articles_in_stream_order(wikipedia, tokenizer):
    sequences = corpus_token_sequences(str(wikipedia), MODEL_STUB, tokenizer, n_samples=4, max_tokens=30, seed=0)
    assert sequences == truncated_ids(tokenizer, USED[:4], 30)
    assert [len(s) for s in sequences] == [20, 30, 30, 30]


def test_parquet_without_a_text_column_is_refused_by_name(tmp_path, tokenizer):
    pq.write_table(pa.table({"id": ["1"], "body": ["The city of Paris is located in France ."]}),
                   tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(CorpusError, match="has no 'text' column .*id, body"):
        corpus_token_sequences(str(tmp_path), MODEL_STUB, tokenizer, n_samples=4, max_tokens=8, seed=0)


def test_identity_of_local_parquet_follows_the_content(tmp_path):
    folder = write_wikipedia(tmp_path / "wikipedia")
    first = corpus_identity(str(folder), 256, 0)
    assert first == corpus_identity(str(folder), 256, 0)
    assert first["corpus"] == "file:20231101.en" and len(first["sha256"]) == 16
    write_wikipedia(tmp_path / "wikipedia", articles=ARTICLES[:-1] + ["The city of Paris ."])
    changed = corpus_identity(str(folder), 256, 0)
    assert changed["sha256"] != first["sha256"]
    assert corpus_identity(str(folder), 128, 0) != changed


# ---------------------------------------------------------------------------
# the hub: wikimedia/wikipedia, streamed
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["wikimedia/wikipedia", "wikimedia/wikipedia:20231101.en", "wikipedia",
                                  "wikipedia:20220301.en"])
def test_wikipedia_streams_wikimedia_20231101_en(fake_hub, tokenizer, caplog, spec):
    with caplog.at_level(logging.INFO, logger="alphaedit_plugin.corpus"):
        for _ in range(2):
            sequences = corpus_token_sequences(spec, MODEL_STUB, tokenizer, n_samples=3, max_tokens=8, seed=0)
            assert sequences == truncated_ids(tokenizer, USED[:3], 8)
            identity = corpus_identity(spec, 8, 0)
    assert fake_hub == [(("wikimedia/wikipedia", "20231101.en"), {"split": "train", "streaming": True})] * 2
    assert identity == {"corpus": "hub:wikimedia/wikipedia:20231101.en", "dataset": "wikimedia/wikipedia",
                        "config": "20231101.en", "split": "train", "max_tokens": 8}
    notes = [r for r in caplog.records if "no longer served" in r.getMessage()]
    if spec.startswith("wikipedia"):
        assert len(notes) == 1 and notes[0].levelno == logging.WARNING  # said once
        assert "wikimedia/wikipedia config 20231101.en" in notes[0].getMessage()
    else:
        assert not notes


def test_the_stream_is_read_no_further_than_n_samples(monkeypatch, tokenizer):
    read = []

    def endless(*args, **kwargs):
        def records():
            for i in range(10 ** 6):
                read.append(i)
                yield {"id": str(i), "text": ARTICLES[i % len(ARTICLES)]}
        return records()
    monkeypatch.setattr(datasets, "load_dataset", endless)
    sequences = corpus_token_sequences("wikimedia/wikipedia", MODEL_STUB, tokenizer, n_samples=5, max_tokens=8, seed=0)
    assert sequences == truncated_ids(tokenizer, USED[:5], 8)
    assert read == list(range(6))  # five articles and the empty one, nothing after


def test_other_configs_and_hub_corpora(fake_hub, tokenizer):
    assert corpus.hub_corpus("wikimedia/wikipedia:20231101.de") == corpus.HubCorpus(
        "wikimedia/wikipedia", "20231101.de")
    assert corpus.hub_corpus("wikipedia:20220301.fr") == corpus.HubCorpus("wikimedia/wikipedia", "20231101.fr")
    assert corpus.hub_corpus("someone/articles") == corpus.HubCorpus("someone/articles", None)
    corpus_token_sequences("someone/articles:small", MODEL_STUB, tokenizer, n_samples=2, max_tokens=8, seed=0)
    assert fake_hub == [(("someone/articles", "small"), {"split": "train", "streaming": True})]
    assert corpus_identity("someone/articles:small", 8, 0)["corpus"] == "hub:someone/articles:small"


# ---------------------------------------------------------------------------
# without datasets, and offline
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("local", [False, True])
def test_without_datasets_the_error_says_what_to_install(monkeypatch, wikipedia, tokenizer, local):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `from datasets import …` raises ImportError
    spec = str(wikipedia) if local else "wikipedia"
    assert corpus_identity(spec, 8, 0)  # the cache key needs no datasets: cached statistics still serve
    with pytest.raises(CorpusError, match=rf"mom2_dataset '{spec}' .*'datasets' package, which is not installed: "
                                          r"pip install 'alphaedit-plugin\[wikipedia\]' \(or pip install datasets\)"):
        corpus_token_sequences(spec, MODEL_STUB, tokenizer, n_samples=3, max_tokens=8, seed=0)


OFFLINE_ERROR = r"needs the hub dataset wikimedia/wikipedia \(config 20231101.en, split train\), which is not in " \
                r"the local datasets cache, and offline mode is on"


def test_offline_and_not_cached_says_how_to_get_it(monkeypatch, tokenizer):
    def offline(*args, **kwargs):  # what datasets 4 raises (see the next test)
        raise ConnectionError("Couldn't reach 'wikimedia/wikipedia' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError) as raised:
        corpus_token_sequences("wikipedia", MODEL_STUB, tokenizer, n_samples=3, max_tokens=8, seed=0)
    message = str(raised.value)
    assert "mom2_dataset 'wikipedia'" in message
    assert raised.match(OFFLINE_ERROR)
    assert "run once with network access" in message and "point mom2_dataset at their folder" in message
    assert "hf download wikimedia/wikipedia --repo-type dataset" in message


def test_real_datasets_offline_with_an_empty_cache(tmp_path):
    """The exception datasets itself raises offline for an uncached dataset becomes the clear error."""
    # The package alone on the path (not the EasyEdit host, whose import takes seconds), an empty HF cache.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    code = textwrap.dedent("""
        from alphaedit_plugin.corpus import CorpusError, _hub_texts
        try:
            next(_hub_texts("wikipedia"))
        except CorpusError as error:
            print(type(error.__cause__).__name__)
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines, done.stderr
    assert lines[0] == "ConnectionError", done.stdout
    assert re.search(OFFLINE_ERROR, lines[1]), lines[1]


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------

def test_create_state_computes_statistics_from_local_wikipedia_parquet(tmp_path, tokenizer):
    folder = write_wikipedia(tmp_path / "wikipedia")
    model = BUILDERS["llama"]()
    hparams = make_hparams(tmp_path, "llama", mom2_dataset=str(folder), mom2_n_samples=4, mom2_max_tokens=12,
                           mom2_dtype="float64", mom2_heldout_fraction=0.0)
    state = create_state(model, tokenizer, hparams)
    texts = [" ".join(text.split()[:12]) for text in USED[:4]]  # one word, one token: the truncated articles
    for layer in hparams.layers:
        name = templates_for(model, hparams).rewrite_module_tmp.format(layer)
        keys = torch.cat(module_inputs(model, tokenizer, name, texts)).double()
        assert state.null_spaces[layer].token_count == len(keys) == 12 + 12 + 12 + 12
        assert state.null_spaces[layer].rank == keys.shape[1] - torch.linalg.matrix_rank(keys)
    moments = load_second_moments(model, tokenizer, hparams, templates_for(model, hparams))  # from the cache
    for layer, moment in moments.items():
        name = templates_for(model, hparams).rewrite_module_tmp.format(layer)
        keys = torch.cat(module_inputs(model, tokenizer, name, texts)).double()
        torch.testing.assert_close(moment, keys.T @ keys / len(keys), rtol=1e-6, atol=1e-9)
