"""Fluency (n-gram entropy) and Consistency (TF-IDF similarity) of generated text.

Fluency, AlphaEdit Eq. 22 (from ROME, Meng et al. 2022, ``compute_n_gram_entropy``):
for a text, with g_n(k) the relative frequency of its n-gram k,

    H_n = -Σ_k g_n(k) log2 g_n(k),     fluency(text) = mean(2/3 · H_2, 4/3 · H_3)

and the reported figure is 100 × the mean over texts (the paper's tables,
e.g. 622.49, are on that scale). ROME tokenises with ``nltk.word_tokenize``;
here words and punctuation marks are split by the regular expression
``\\w+|[^\\w\\s]`` (no nltk), which agrees on ordinary English text except
for contractions ("don't" gives 3 tokens here, 2 in nltk).

Consistency (ROME's "reference score"): the cosine similarity of TF-IDF
vectors of the generated text and reference text about the new target.
ROME takes the reference text from Wikipedia (``attribute_snippets.json``)
and the IDF from a Wikipedia sample; neither ships with the CounterFact
files, so Consistency is only computed when the user provides reference
texts, with IDF fitted on those reference texts (stated in the results).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

TOKEN = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> List[str]:
    return TOKEN.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's weighted n-gram entropy of one text (bits); 0 for a text too short to have n-grams."""
    tokens = words(text)
    values = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


def fluency(texts: Iterable[str]) -> float:
    """100 × the mean n-gram entropy of the texts (the paper's scale)."""
    texts = list(texts)
    if not texts:
        raise ValueError("fluency of no texts")
    return 100 * sum(ngram_entropy(t) for t in texts) / len(texts)


def fit_idf(documents: Sequence[str]) -> Dict[str, float]:
    """Smoothed IDF (as scikit-learn's TfidfVectorizer): ln((1+N)/(1+df)) + 1, lower-cased words."""
    df = Counter()
    for doc in documents:
        df.update(set(w.lower() for w in words(doc)))
    n = len(documents)
    return {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}


def tfidf_similarity(text_a: str, text_b: str, idf: Optional[Dict[str, float]] = None) -> float:
    """Cosine similarity of the two texts' TF-IDF vectors (unknown words get the largest IDF)."""
    idf = idf if idf is not None else fit_idf([text_a, text_b])
    default = max(idf.values()) if idf else 1.0

    def vector(text):
        counts = Counter(w.lower() for w in words(text))
        return {w: c * idf.get(w, default) for w, c in counts.items()}

    a, b = vector(text_a), vector(text_b)
    dot = sum(v * b.get(w, 0.0) for w, v in a.items())
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0
