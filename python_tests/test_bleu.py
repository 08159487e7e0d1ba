"""Corpus BLEU against sacrebleu's own numbers.

The expected figures were printed by sacrebleu 2.6.0 (installed only to
produce them, not a dependency) with its defaults:
``sacrebleu.corpus_bleu(hyps, refs).score`` and ``sacrebleu.sentence_bleu(hyp, refs).score``
(13a tokenisation, exp smoothing, mixed case); the tokeniser's outputs are
``sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a()(line)``.
"""
import pytest

from cellkern.train.bleu import best_constant, best_matches, corpus_bleu, sentence_bleu, tokenize_13a

CASES = {
    "single": (["the cat sat on the mat"], [["the cat sat on a mat"]], 53.7284965911771),
    "corpus": (["Hello, how are you?", "I am fine. Thank you!", "It's 3.5-4 km away.", "No."],
               [["Hello, how are you doing?", "I'm fine, thanks!", "It is 3.5 - 4 km away.", "Yes."]],
               52.75899043143755),
    "short_hyp": (["a b c"], [["a b c d e f"]], 0.0),        # no 4-gram at all: 0, as sacrebleu
    "brevity": (["the quick brown fox jumps", "over the lazy dog today"],
                [["the quick brown fox jumps over", "over the very lazy dog today again"]], 54.441910217790564),
    "multi_ref": (["the cat is on the mat", "there is a dog"],
                  [["the cat sat on the mat", "a dog is there"], ["there is a cat on the mat", "there is a big dog"]],
                  42.044820762685724),
    "no_match": (["x y z"], [["a b c"]], 0.0),
    "html_entities": (["AT&amp;T &quot;rocks&quot; &lt;b&gt;"], [['AT&T "rocks" <b>']], 100.00000000000004),
}


@pytest.mark.parametrize("name", list(CASES))
def test_corpus_bleu_matches_sacrebleu(name):
    hyps, streams, expected = CASES[name]
    refs = [list(r) for r in zip(*streams)]   # sacrebleu's reference streams -> references per segment
    assert corpus_bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)


def test_single_reference_strings_and_sentence_bleu():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(53.7284965911771)
    assert sentence_bleu("Hello there friend", ["Hello there my friend"]) == pytest.approx(45.13864405503391)
    assert sentence_bleu("Yes", ["Yes."]) == pytest.approx(36.78794411714425)


@pytest.mark.parametrize("line, expected", [
    ("Hello, world! It's 3.5-4 km.", "Hello , world ! It's 3.5 - 4 km ."),
    ("e-mail me at a@b.com (now)", "e-mail me at a @ b . com ( now )"),
    ("1,000.50 dollars; $5", "1,000.50 dollars ; $ 5"),
])
def test_13a_tokeniser(line, expected):
    assert tokenize_13a(line) == expected


def test_baseline_choices():
    refs = ["the cat sat", "the dog sat", "a cat ran"]
    cands = ["zebra", "the cat sat", "a cat ran fast"]
    assert best_matches(cands, refs) == [1, 1, 2]
    scores = [corpus_bleu([c] * len(refs), refs) for c in cands]
    assert best_constant(cands, refs) == max(range(len(cands)), key=lambda i: (scores[i], -i))


def test_errors():
    with pytest.raises(ValueError, match="one entry per hypothesis"):
        corpus_bleu(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="sequences of segments"):
        corpus_bleu("a", ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu(["a"], [[]])
