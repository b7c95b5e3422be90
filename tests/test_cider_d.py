"""CIDEr-D: a hand-computed example, agreement with pycocoevalcap, and the cached df file."""
import json
import math
import pickle
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from mue.evaluation.cider_d import CiderD, ngram_counts

# two documents (images): idf of an n-gram in one of them is log(2) - log(1) = log 2;
# an n-gram in neither also gets log 2 (df counted as 1), one in both gets 0.
CORPUS = [["a b"], ["c d"]]
LOG2 = math.log(2)


def test_document_frequencies_count_images_not_sentences():
    df, num_docs = CiderD.document_frequencies([["a b", "a c"], ["a"]])
    assert num_docs == 2
    assert df[("a",)] == 2 and df[("b",)] == 1 and df[("a", "b")] == 1 and ("b", "c") not in df


def test_hand_computed_clipping():
    # candidate "a a" vs reference "a b":
    #   1-grams: cand {a: 2 log2}, ref {a: log2, b: log2}; clipped dot min(2log2, log2)*log2 = log2^2,
    #            norms 2 log2 and sqrt(2) log2  ->  1 / (2 sqrt 2)   (unclipped it would be 1 / sqrt 2)
    #   2-grams: (a a) vs (a b): 0; no 3-, 4-grams; equal lengths: no penalty
    #   score = 10 * mean(1/(2 sqrt 2), 0, 0, 0) / 1 reference
    expected = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert CiderD.from_corpus(CORPUS).score("a a", ["a b"]) == pytest.approx(expected, rel=1e-12)


def test_hand_computed_length_penalty_and_reference_mean():
    # candidate "a b" vs references ["a b c", "c d"] (idf of c and d: log2 each, as is that of a, b)
    # ref 1 "a b c": 1-grams cos = 2 log2^2 / (sqrt2 log2 * sqrt3 log2) = 2/sqrt6,
    #                2-grams (a b) vs {(a b), (b c)}: 1/sqrt2; lengths 2 vs 3 words: exp(-1/72)
    # ref 2 "c d": nothing shared -> 0
    pen = math.exp(-1 / (2 * 6.0 ** 2))
    expected = 10 * ((2 / math.sqrt(6) + 1 / math.sqrt(2)) * pen / 4) / 2
    scorer = CiderD.from_corpus(CORPUS)
    assert scorer.score("a b", ["a b c", "c d"]) == pytest.approx(expected, rel=1e-12)
    # a perfect match is 10 * mean over n of cos=1 for the orders present (1- and 2-grams)
    assert scorer.score("a b", ["a b"]) == pytest.approx(10 * 2 / 4)
    # an n-gram found in every document has idf 0 and so no weight
    assert CiderD.from_corpus([["a b"], ["a c"]]).score("a", ["a"]) == 0.0


def random_sentence(rng, vocab, lo=1, hi=9):
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_pycocoevalcap_cider_on_its_corpus(seed):
    # pycocoevalcap's Cider takes df from the references being scored; so does CiderD(df=None),
    # and so does CiderD.from_corpus on the same references. Random sentences include repeats
    # (clipping active) and unequal lengths (length penalty active).
    rng = random.Random(seed)
    vocab = "a b c d e f g".split()
    refs = [[random_sentence(rng, vocab) for _ in range(rng.randint(1, 4))] for _ in range(12)]
    cands = [random_sentence(rng, vocab, 0 if i == 0 else 1) for i in range(12)]
    _, reference = Cider().compute_score({i: r for i, r in enumerate(refs)},
                                         {i: [c] for i, c in enumerate(cands)})
    assert reference.max() > 0
    np.testing.assert_allclose(CiderD().batch_scores(cands, refs), reference, rtol=1e-10, atol=1e-12)
    fixed = CiderD.from_corpus(refs)
    np.testing.assert_allclose(fixed.batch_scores(cands, refs), reference, rtol=1e-10, atol=1e-12)
    assert fixed.score(cands[3], refs[3]) == pytest.approx(reference[3], rel=1e-10)


def test_fixed_df_differs_from_per_batch_df():
    refs = [["a b c"], ["a b d"], ["e f"]]
    fixed = CiderD.from_corpus(refs + [["a x"], ["a y"]])  # "a" is common in the training corpus
    batch = CiderD()
    assert fixed.batch_scores(["a b c"], refs[:1])[0] != pytest.approx(batch.batch_scores(["a b c"], refs[:1])[0])


def test_df_file_round_trip_json_and_ofa_pickle(tmp_path):
    corpus = [["a man rides a horse", "a person on a horse"], ["two dogs play"], ["a dog runs"]]
    scorer = CiderD.from_corpus(corpus)
    cands, refs = ["a man on a horse", "dogs play"], [corpus[0], corpus[1]]
    want = scorer.batch_scores(cands, refs)

    path = tmp_path / "df.json"
    scorer.save_df(str(path))
    loaded = CiderD.load_df(str(path))
    assert loaded.df == scorer.df and loaded.num_docs == 3
    np.testing.assert_array_equal(loaded.batch_scores(cands, refs), want)

    ofa_style = tmp_path / "coco-train-words.p"
    with open(ofa_style, "wb") as f:
        pickle.dump({"document_frequency": scorer.df, "ref_len": 3}, f)
    np.testing.assert_allclose(CiderD.load_df(str(ofa_style)).batch_scores(cands, refs), want)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"df": {}}))
    with pytest.raises(ValueError, match="bad.json: not a CIDEr-D document-frequency file"):
        CiderD.load_df(str(bad))


def test_bad_input_is_named():
    scorer = CiderD.from_corpus(CORPUS)
    with pytest.raises(ValueError, match="references of candidate 1"):
        scorer.batch_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        scorer.batch_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="reference corpus item 0"):
        CiderD.document_frequencies(["a b"])  # a bare string, not a list of sentences
    with pytest.raises(ValueError, match="needs fixed document frequencies"):
        CiderD().score("a", ["a"])
    assert ngram_counts("a a b", 2) == {("a",): 2, ("b",): 1, ("a", "a"): 1, ("a", "b"): 1}
