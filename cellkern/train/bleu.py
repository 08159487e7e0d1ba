"""Corpus BLEU with sacrebleu's definition, in plain Python (no dependency).

The score of :func:`corpus_bleu` is sacrebleu's default ``BLEU()`` corpus
score (sacrebleu 2.x, signature ``nrefs:N|case:mixed|eff:no|tok:13a|smooth:exp``):

* each segment is right-stripped and tokenised by the ``13a`` tokeniser
  (mteval-v13a: punctuation split off except inside numbers);
* n-gram precisions for n = 1…4 from counts summed over the corpus, each
  hypothesis n-gram clipped by its largest count in any of its references;
* the reference length of a segment is its reference closest in length to the
  hypothesis (the shorter on ties); brevity penalty ``exp(1 − r/c)`` when the
  corpus hypothesis length ``c`` is below the reference length ``r``;
* ``exp`` smoothing (NIST): the k-th order with no match counts
  ``1 / (2^k · total)`` instead of 0; no match at all scores 0;
* the result is ``100 · BP · exp(mean log pₙ)``, on the 0–100 scale.

``python_tests/test_bleu.py`` checks it against numbers sacrebleu printed for fixed cases.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence, Union

__all__ = ["tokenize_13a", "corpus_bleu", "sentence_bleu", "sentence_stats", "best_matches", "best_constant"]

MAX_ORDER = 4

_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation, unless between digits
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),                # period and comma not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),                # period and comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),                     # a dash after a digit
]


def tokenize_13a(line: str) -> str:
    """``line`` tokenised as sacrebleu's ``13a`` tokeniser does (tokens joined by one space).

    Example:
        >>> tokenize_13a("Hello, world! It's 3.5-4 km.")
        "Hello , world ! It's 3.5 - 4 km ."
    """
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: list) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def sentence_stats(hypothesis: str, references: Sequence[str]) -> list:
    """One segment's sufficient statistics ``[hyp_len, ref_len, correct₁…₄, total₁…₄]``."""
    hyp = tokenize_13a(hypothesis.rstrip()).split()
    ref_counts: Counter = Counter()
    ref_lens = []
    for ref in references:
        toks = tokenize_13a(ref.rstrip()).split()
        ref_lens.append(len(toks))
        for g, c in _ngrams(toks).items():
            if c > ref_counts[g]:
                ref_counts[g] = c
    ref_len = min(ref_lens, key=lambda r: (abs(len(hyp) - r), r))
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    for g, c in _ngrams(hyp).items():
        total[len(g) - 1] += c
        correct[len(g) - 1] += min(c, ref_counts.get(g, 0))
    return [len(hyp), ref_len] + correct + total


def _score(stats: list, effective_order: bool = False) -> float:
    """sacrebleu's ``compute_bleu`` on summed statistics (``exp`` smoothing)."""
    sys_len, ref_len = stats[0], stats[1]
    correct, total = stats[2:2 + MAX_ORDER], stats[2 + MAX_ORDER:]
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    logs = [-9999999999.0] * MAX_ORDER  # sacrebleu's log(0)
    order, smooth = MAX_ORDER, 1.0
    for n in range(MAX_ORDER):
        if total[n] == 0:
            break
        if effective_order:
            order = n + 1
        if correct[n] == 0:
            smooth *= 2
            logs[n] = math.log(100.0 / (smooth * total[n]))
        else:
            logs[n] = math.log(100.0 * correct[n] / total[n])
    return bp * math.exp(sum(logs[:order]) / order)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Union[str, Sequence[str]]]) -> float:
    """Corpus BLEU on sacrebleu's 0–100 scale (see the module docstring).

    Args:
        hypotheses: the system's output, one string per segment.
        references: per segment, its reference string or a sequence of
            reference strings (multi-reference BLEU).

    Returns:
        the score, a float in [0, 100] (0 for an empty corpus).

    Example:
        >>> round(corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]), 2)
        53.73
    """
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("corpus_bleu: hypotheses and references must be sequences of segments, got a str")
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: references must have one entry per hypothesis ({len(hypotheses)}), "
                         f"got {len(references)}")
    stats = [0] * (2 + 2 * MAX_ORDER)
    for hyp, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("corpus_bleu: every hypothesis needs at least one reference, got an empty list")
        stats = [a + b for a, b in zip(stats, sentence_stats(hyp, refs))]
    return _score(stats)


def sentence_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """Sentence BLEU as sacrebleu's ``sentence_bleu`` (effective order: the
    orders the hypothesis has no n-gram of are left out; ``exp`` smoothing)."""
    stats = sentence_stats(hypothesis, [references] if isinstance(references, str) else references)
    return _score(stats, effective_order=True)


def _prepared(text: str) -> tuple:
    toks = tokenize_13a(text.rstrip()).split()
    return _ngrams(toks), len(toks)


def best_matches(candidates: Sequence[str], references: Sequence[str]) -> list:
    """For each reference, the index of the candidate with the highest
    :func:`sentence_bleu` against it (the lowest index on ties; 0 when none
    shares a token) — the answer-bank oracle's choice."""
    cands = [_prepared(c) for c in candidates]
    index: dict = {}
    for i, (grams, _) in enumerate(cands):
        for g in grams:
            if len(g) == 1:
                index.setdefault(g, []).append(i)
    out = []
    for ref in references:
        rgrams, rlen = _prepared(ref)
        pool = sorted({i for g in rgrams if len(g) == 1 for i in index.get(g, ())})
        best, best_score = 0, -1.0
        for i in pool:
            grams, hlen = cands[i]
            correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
            for g, c in grams.items():
                total[len(g) - 1] += c
                correct[len(g) - 1] += min(c, rgrams.get(g, 0))
            score = _score([hlen, rlen] + correct + total, effective_order=True)
            if score > best_score:
                best, best_score = i, score
        out.append(best)
    return out


def best_constant(candidates: Sequence[str], references: Sequence[str]) -> int:
    """The index of the candidate that, given as the answer to every segment,
    has the highest :func:`corpus_bleu` against ``references`` (one per
    segment; the lowest index on ties) — the best-constant-answer baseline."""
    refs = [_prepared(r) for r in references]
    ref_len = sum(n for _, n in refs)
    by_gram: dict = {}  # n-gram -> {count in a reference: how many references}
    for grams, _ in refs:
        for g, c in grams.items():
            d = by_gram.setdefault(g, {})
            d[c] = d.get(c, 0) + 1
    best, best_score = 0, -1.0
    for i, cand in enumerate(candidates):
        grams, hlen = _prepared(cand)
        correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
        for g, c in grams.items():
            total[len(g) - 1] += c * len(refs)
            correct[len(g) - 1] += sum(min(c, k) * m for k, m in by_gram.get(g, {}).items())
        score = _score([hlen * len(refs), ref_len] + correct + total)
        if score > best_score:
            best, best_score = i, score
    return best
