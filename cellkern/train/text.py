"""Text for the lattice: question/answer pairs and a fixed offline sentence encoder.

* :func:`load_chatterbot` — the English conversations of the ``chatterbot-corpus``
  package (BSD, YAML files inside the wheel, no download): consecutive turns
  become (question, answer) pairs;
* :func:`load_pairs_file` — a user's own pairs, a two-column TSV (``.tsv``,
  ``.txt``) or CSV (``.csv``) file;
* both go through :func:`make_pairs`: whitespace collapsed, duplicates (same
  question and answer up to case) removed, then a seeded split **by
  question** (every pair of a question lands on the same side);
* :class:`SentenceEncoder` — hashed TF-IDF of words, word bigrams and
  character n-grams (IDF fitted on the training questions and answers),
  projected by a fixed seeded Gaussian matrix to ``dim`` values and
  L2-normalised: deterministic, no model to fetch.
"""
from __future__ import annotations

import csv
import math
import numbers
import pathlib
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = ["QAData", "conversation_pairs", "make_pairs", "load_chatterbot", "load_pairs_file", "load_qa",
           "SentenceEncoder", "ENCODER_DIM"]

#: the sentence vector's length: laid on the input face as a 16 × 16 image
ENCODER_DIM = 256
CODE_FENCE = "```"


@dataclass
class QAData:
    """(question, answer) pairs split into train and test (by question).

    Attributes:
        train_q, train_a, test_q, test_a: the texts, pair i is ``(q[i], a[i])``.
        name: where they came from.
    """

    train_q: list
    train_a: list
    test_q: list
    test_a: list
    name: str

    #: the trainer's label-decoder count; a text task has no classes
    n_classes = None


def _clean(text) -> str:
    return " ".join(str(text).split())


def conversation_pairs(conversations: Iterable[Sequence]) -> list:
    """Consecutive turns of each conversation (a list of turns) as ``(question,
    answer)`` pairs; a pair with a code block (a turn holding a fenced `````
    block) is dropped, and so is an entry that is not a list (one of the
    corpus's trivia conversations is a bare string)."""
    pairs = []
    for conv in conversations:
        if not isinstance(conv, (list, tuple)):
            continue
        turns = [str(t) for t in conv]
        for q, a in zip(turns, turns[1:]):
            if CODE_FENCE in q or CODE_FENCE in a:
                continue
            pairs.append((q, a))
    return pairs


def make_pairs(pairs: Iterable[tuple], *, seed: int = 0, test_fraction: float = 0.2, name: str = "pairs") -> QAData:
    """Clean, de-duplicate and split ``pairs``.

    Whitespace runs become one space; a pair whose question and answer equal an
    earlier pair's up to case is dropped (the first one stays). The distinct
    questions (up to case) are shuffled with ``seed`` and the first
    ``round(test_fraction · n)`` go to test, with all their pairs; the pairs
    keep their order of appearance on each side.

    Args:
        pairs: ``(question, answer)`` strings.
        seed: the split's seed. Default: 0.
        test_fraction: the share of distinct questions held out, in (0, 1). Default: 0.2.
        name: the data's name in the report. Default: ``"pairs"``.

    Example:
        >>> d = make_pairs([("Hi", "Hello"), ("hi", "hello"), ("How are you?", "Fine.")], test_fraction=0.5)
        >>> len(d.train_q) + len(d.test_q)
        2
    """
    op = "make_pairs"
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{op}: seed must be an int >= 0, got {seed!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"{op}: test_fraction must be a number in (0, 1), got {test_fraction!r}")
    seen, kept = set(), []
    for q, a in pairs:
        q, a = _clean(q), _clean(a)
        key = (q.casefold(), a.casefold())
        if q and a and key not in seen:
            seen.add(key)
            kept.append((q, a))
    questions = list(dict.fromkeys(q.casefold() for q, _ in kept))
    if len(questions) < 2:
        raise ValueError(f"{op}: {name} must hold at least 2 distinct questions to split, got {len(questions)}")
    order = np.random.default_rng(seed).permutation(len(questions))
    n_test = min(max(int(round(test_fraction * len(questions))), 1), len(questions) - 1)
    test = {questions[i] for i in order[:n_test]}
    tr = [(q, a) for q, a in kept if q.casefold() not in test]
    te = [(q, a) for q, a in kept if q.casefold() in test]
    return QAData([q for q, _ in tr], [a for _, a in tr], [q for q, _ in te], [a for _, a in te], name)


def _corpus_dir() -> pathlib.Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise ImportError("load_chatterbot: the English conversations come from the chatterbot-corpus package: "
                          "pip install chatterbot-corpus (or cellkern's 'text' extra)") from None
    return pathlib.Path(chatterbot_corpus.__file__).parent / "data" / "english"


def load_chatterbot(seed: int = 0, test_fraction: float = 0.2) -> QAData:
    """The English conversations of ``chatterbot-corpus`` as pairs (see :func:`make_pairs`).

    Every ``data/english/*.yml`` of the installed package is read with
    ``yaml.safe_load`` in file-name order; 1 078 pairs remain (chatterbot-corpus
    1.3.3) after the code blocks and duplicates are dropped.

    Example:
        >>> d = load_chatterbot()  # doctest: +SKIP
    """
    import yaml

    pairs = []
    for path in sorted(_corpus_dir().glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        pairs += conversation_pairs(doc.get("conversations", []))
    return make_pairs(pairs, seed=seed, test_fraction=test_fraction, name="chatterbot-corpus english")


def load_pairs_file(path, seed: int = 0, test_fraction: float = 0.2) -> QAData:
    """Pairs from a two-column file: tab-separated (``.tsv``, ``.txt``) or CSV
    (``.csv``, quoted fields allowed), one ``question<sep>answer`` per line;
    blank lines are skipped, no header.

    Raises:
        ValueError: the file is missing, unreadable as UTF-8, or a line has no
            two non-empty columns (the message names the file and the line).
    """
    op = "load_pairs_file"
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{op}: no such pairs file {str(path)!r} (expected a .tsv or .csv file of question, answer)")
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".txt", ".csv"):
        raise ValueError(f"{op}: {path}: the file must end in .tsv, .txt or .csv, got {suffix or 'no suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{op}: {path} is not UTF-8 text: {exc}") from None
    lines = text.splitlines()
    if suffix == ".csv":
        rows = csv.reader(lines)
    else:
        rows = (line.split("\t") for line in lines)
    pairs = []
    for lineno, row in enumerate(rows, 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            sep = "comma" if suffix == ".csv" else "tab"
            raise ValueError(f"{op}: {path}, line {lineno}: expected 2 non-empty {sep}-separated columns "
                             f"(question, answer), got {len(row)} column(s): {lines[lineno - 1][:80]!r}")
        pairs.append((row[0], row[1]))
    if not pairs:
        raise ValueError(f"{op}: {path} holds no pairs")
    return make_pairs(pairs, seed=seed, test_fraction=test_fraction, name=path.name)


def load_qa(data: str, seed: int = 0) -> QAData:
    """The pairs a config names: ``"qa"`` (chatterbot-corpus) or a pairs file."""
    if data == "qa":
        return load_chatterbot(seed=seed)
    return load_pairs_file(data, seed=seed)


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _features(text: str, char_ngrams: tuple) -> Counter:
    """Word, word-bigram and character n-gram strings of ``text`` (lower-cased)."""
    words = _WORD.findall(text.lower())
    feats = Counter("w " + w for w in words)
    feats.update("b " + a + " " + b for a, b in zip(words, words[1:]))
    lo, hi = char_ngrams
    for w in words:
        padded = f" {w} "
        for n in range(lo, hi + 1):
            feats.update("c " + padded[i:i + n] for i in range(len(padded) - n + 1))
    return feats


class SentenceEncoder:
    """Hashed TF-IDF sentence vectors, randomly projected.

    A text's features are its lower-cased words, word bigrams and character
    n-grams (inside word boundaries), each hashed by CRC-32 into ``buckets``.
    Term weights are ``(1 + ln tf) · idf`` with ``idf = ln((1 + n)/(1 + df)) + 1``
    fitted on ``fit``'s texts; the row is L2-normalised (:meth:`tfidf`, the
    plain TF-IDF of the retrieval baseline), multiplied by a fixed Gaussian
    matrix ``R`` ``[buckets, dim]`` drawn from ``seed`` and L2-normalised
    again (:meth:`encode`). Same texts, same fit, same seed: same vectors, in
    any process (CRC-32, not Python's salted ``hash``).

    Args:
        dim: the vector's length. Default: 256 (:data:`ENCODER_DIM`).
        buckets: hash buckets. Default: 2¹⁵.
        char_ngrams: ``(lo, hi)`` character n-gram lengths. Default: (3, 5).
        seed: the projection's seed. Default: 0.

    Example:
        >>> enc = SentenceEncoder(dim=16, buckets=256).fit(["hello there", "how are you"])
        >>> tuple(enc.encode(["hello you"]).shape)
        (1, 16)
    """

    def __init__(self, dim: int = ENCODER_DIM, buckets: int = 2 ** 15, char_ngrams: tuple = (3, 5), seed: int = 0):
        for n, v in (("dim", dim), ("buckets", buckets)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"SentenceEncoder: {n} must be a positive int, got {v!r}")
        if (not isinstance(char_ngrams, (tuple, list)) or len(char_ngrams) != 2
                or not all(isinstance(n, int) and n >= 1 for n in char_ngrams) or char_ngrams[0] > char_ngrams[1]):
            raise ValueError(f"SentenceEncoder: char_ngrams must be (lo, hi) with 1 <= lo <= hi, got {char_ngrams!r}")
        self.dim, self.buckets, self.char_ngrams, self.seed = int(dim), int(buckets), tuple(char_ngrams), int(seed)
        self.idf: Optional[torch.Tensor] = None
        self._proj: Optional[torch.Tensor] = None

    def _counts(self, texts: Sequence[str]) -> list:
        out = []
        for t in texts:
            c: Counter = Counter()
            for f, k in _features(t, self.char_ngrams).items():
                c[zlib.crc32(f.encode("utf-8")) % self.buckets] += k
            out.append(c)
        return out

    def fit(self, texts: Sequence[str]) -> "SentenceEncoder":
        """Fit the IDF on ``texts`` (the training questions and answers)."""
        counts = self._counts(texts)
        df = torch.zeros(self.buckets, dtype=torch.float64)
        for c in counts:
            df[torch.tensor(sorted(c), dtype=torch.long)] += 1
        self.idf = (torch.log((1 + len(counts)) / (1 + df)) + 1).to(torch.float32)
        return self

    def tfidf(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised TF-IDF rows, a sparse COO ``[n, buckets]`` float32 (coalesced)."""
        if self.idf is None:
            raise ValueError("SentenceEncoder.tfidf: call fit first")
        rows, cols, vals = [], [], []
        for i, c in enumerate(self._counts(texts)):
            keys = sorted(c)
            v = torch.tensor([1 + math.log(c[k]) for k in keys], dtype=torch.float32) * self.idf[keys]
            vals.append(v / v.norm().clamp_min(1e-12))
            rows += [i] * len(keys)
            cols += keys
        values = torch.cat(vals) if vals else torch.zeros(0)
        return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).view(2, -1), values,
                                       (len(texts), self.buckets), check_invariants=True).coalesce()

    def projection(self) -> torch.Tensor:
        """The fixed matrix ``R`` ``[buckets, dim]``, N(0, 1/dim) entries from ``seed``."""
        if self._proj is None:
            g = torch.Generator().manual_seed(self.seed)
            self._proj = torch.randn(self.buckets, self.dim, generator=g) / math.sqrt(self.dim)
        return self._proj

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence vectors ``[n, dim]`` float32, unit L2 norm."""
        v = torch.sparse.mm(self.tfidf(texts), self.projection())
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
