"""The text task's data and encoder (cellkern.train.text)."""
import pathlib
import zlib

import pytest
import torch

from cellkern.train.text import (SentenceEncoder, conversation_pairs, load_chatterbot, load_pairs_file, load_qa,
                                 make_pairs)

PAIRS = pathlib.Path(__file__).parent / "data" / "qa_pairs.tsv"


def test_loader_on_the_fixture():
    d = load_pairs_file(PAIRS, seed=0)
    # 40 lines, one exact duplicate ("Hello" -> "Hi there!") dropped
    assert len(d.train_q) + len(d.test_q) == 39
    assert len(d.train_q) == len(d.train_a) and len(d.test_q) == len(d.test_a)
    # split by question: "What is AI?" has two answers, both on one side
    sides = {("train" if q in d.train_q else "test") for q in ("What is AI?",)}
    assert len(sides) == 1
    ai = d.train_q if "What is AI?" in d.train_q else d.test_q
    assert ai.count("What is AI?") == 2
    assert not set(map(str.casefold, d.train_q)) & set(map(str.casefold, d.test_q))
    # seeded: the same seed, the same split; another seed, another split
    assert load_pairs_file(PAIRS, seed=0).test_q == d.test_q
    assert load_pairs_file(PAIRS, seed=1).test_q != d.test_q


def test_csv_and_tsv_agree(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text('"Hi, you","Hello, friend"\nHow are you?,Fine.\n\nBye,See you\n')
    d = load_pairs_file(p, test_fraction=0.34)
    assert sorted(d.train_q + d.test_q) == ["Bye", "Hi, you", "How are you?"]
    assert "Hello, friend" in d.train_a + d.test_a


def test_make_pairs_cleans_and_deduplicates():
    d = make_pairs([("Hi  there", "Hello\n you"), ("hi there", "hello you"), ("Q", "A")], test_fraction=0.5)
    assert sorted(d.train_q + d.test_q) == ["Hi there", "Q"]
    assert "Hello you" in d.train_a + d.test_a


def test_conversation_pairs_drop_code_blocks():
    convs = [["a", "b", "c"], ["write code", "```\nprint(1)\n```", "thanks"], "a bare string"]
    assert conversation_pairs(convs) == [("a", "b"), ("b", "c")]


@pytest.mark.parametrize("content, match", [
    ("only one column\n", r"line 1: expected 2 non-empty tab-separated columns"),
    ("q\ta\nq2\ta2\textra\n", r"line 2: expected 2 non-empty tab-separated columns .* got 3 column"),
    ("q\t\n", r"line 1: expected 2 non-empty"),
    ("\n\n", r"holds no pairs"),
])
def test_malformed_pairs_file(tmp_path, content, match):
    p = tmp_path / "bad.tsv"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as exc:
        load_pairs_file(p)
    assert "bad.tsv" in str(exc.value)


def test_missing_or_misnamed_pairs_file(tmp_path):
    with pytest.raises(ValueError, match=r"no such pairs file .*nope\.tsv"):
        load_pairs_file(tmp_path / "nope.tsv")
    p = tmp_path / "pairs.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match=r"pairs\.json.*must end in \.tsv, \.txt or \.csv"):
        load_pairs_file(p)
    p = tmp_path / "bad.csv"
    p.write_bytes(b"\xff\xfe q,a\n")
    with pytest.raises(ValueError, match="bad.csv is not UTF-8"):
        load_pairs_file(p)


def test_load_qa_names_a_file(tmp_path):
    assert load_qa(str(PAIRS)).name == "qa_pairs.tsv"


def test_chatterbot_corpus():
    pytest.importorskip("chatterbot_corpus")
    d = load_chatterbot(seed=0)
    n = len(d.train_q) + len(d.test_q)
    assert 1000 <= n <= 1200 and not any("```" in a for a in d.train_a + d.test_a)
    assert abs(len(d.test_q) / n - 0.2) < 0.05


def _texts():
    d = load_pairs_file(PAIRS)
    return d.train_q + d.train_a, d.test_q


def test_encoder_is_deterministic_and_normalised():
    fit, texts = _texts()
    a = SentenceEncoder(seed=3).fit(fit).encode(texts)
    b = SentenceEncoder(seed=3).fit(fit).encode(texts)
    assert a.shape == (len(texts), 256) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    assert not torch.equal(a, SentenceEncoder(seed=4).fit(fit).encode(texts))   # the seed picks the projection


def test_encoder_features_are_crc32_hashed():
    """Words, word bigrams and character 3-5-grams inside word boundaries, hashed
    by CRC-32 (not Python's salted hash()), so every process sees the same buckets."""
    feats = ["w hi", "w you", "b hi you", "c  hi", "c hi ", "c  hi ", "c  yo", "c you", "c ou ", "c  you",
             "c you ", "c  you "]
    enc = SentenceEncoder().fit(["hi you"])
    assert enc.tfidf(["Hi, you!"]).indices()[1].tolist() == sorted({zlib.crc32(f.encode()) % 2 ** 15 for f in feats})


def test_encoder_similarity_follows_shared_words():
    enc = SentenceEncoder().fit(["what is your name", "what is the time", "tell me a joke"])
    v = enc.encode(["what is your name", "what is your name please", "tell me a joke"])
    assert float(v[0] @ v[1]) > 0.5 and float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3


def test_encoder_errors():
    with pytest.raises(ValueError, match="call fit first"):
        SentenceEncoder().encode(["a"])
    with pytest.raises(ValueError, match="dim must be a positive int"):
        SentenceEncoder(dim=0)
    with pytest.raises(ValueError, match="char_ngrams"):
        SentenceEncoder(char_ngrams=(5, 3))
