"""Caption metrics: pycocoevalcap wrapper, decomposable BLEU/CIDEr statistics, results file and CLI."""
import json
import logging
import math

import pytest

from mue.evaluation import caption_metrics as cm

# two images with disjoint words: every n-gram occurs in one image only, so its idf weight is log(2)
REFS = {
    "1": ["a black cat sleeps on the red sofa"],
    "2": ["two dogs run across green grass today"],
}


def test_identical_hypothesis_gives_bleu_one_and_cider_ten():
    """hyp == the only reference: every precision is 1, every tf-idf cosine is 1 -> CIDEr 10."""
    hyps = {k: v[0] for k, v in REFS.items()}
    out = cm.compute_caption_metrics(hyps, REFS, metrics=("bleu", "rouge", "cider"))
    for n in range(1, 5):
        assert out[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert out["ROUGE_L"] == pytest.approx(1.0)
    assert out["CIDEr"] == pytest.approx(10.0)
    assert out["num_images"] == 2
    assert "METEOR" not in out and "SPICE" not in out


def test_hand_checked_bleu():
    """'the cat sat on the mat' vs 'the cat is on the mat': p1=5/6, p2=3/5, p3=1/4, p4=0, same length."""
    hyps = {"x": "the cat sat on the mat"}
    refs = {"x": ["the cat is on the mat"]}
    out = cm.compute_caption_metrics(hyps, refs, metrics=("bleu",))
    assert out["Bleu_1"] == pytest.approx(5 / 6)
    assert out["Bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert out["Bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert out["Bleu_4"] < 1e-3
    # the decomposable statistics give the same corpus numbers
    st = cm.bleu_stats("the cat sat on the mat", refs["x"])
    assert st["correct"] == [5, 3, 1, 0] and st["guess"] == [6, 5, 4, 3]
    b = cm.corpus_bleu(st["correct"], st["guess"], st["testlen"], st["reflen"])
    assert b[:3] == pytest.approx([out["Bleu_1"], out["Bleu_2"], out["Bleu_3"]])


def test_corpus_bleu_from_summed_stats_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    refs = {"a": ["a man rides a horse", "a person riding a brown horse"],
            "b": ["a plate of food on a table", "food on a white plate"],
            "c": ["a dog"]}
    hyps = {"a": "a man riding a horse on a beach", "b": "a plate with food", "c": "a small dog runs"}
    sums = {"correct": [0] * 4, "guess": [0] * 4, "testlen": 0, "reflen": 0}
    for k in refs:
        st = cm.bleu_stats(hyps[k], refs[k])
        for key in ("correct", "guess"):
            sums[key] = [x + y for x, y in zip(sums[key], st[key])]
        sums["testlen"] += st["testlen"]
        sums["reflen"] += st["reflen"]
    ours = cm.corpus_bleu(sums["correct"], sums["guess"], sums["testlen"], sums["reflen"])
    theirs, _ = Bleu(4).compute_score(refs, {k: [v] for k, v in hyps.items()}, verbose=0)
    assert ours == pytest.approx(theirs)
    # brevity penalty is applied when the hypotheses are shorter
    short = cm.corpus_bleu([2, 1, 0, 0], [2, 1, 0, 0], 2, 4)
    assert short[0] == pytest.approx(math.exp(1 - 2))


def test_validation_cider_hand_checked_and_equal_to_pycocoevalcap():
    """Validation sums per-image CIDEr-D with the split's document frequencies (cider_d.CiderD): its mean
    must equal pycocoevalcap's corpus CIDEr reported at test time."""
    from pycocoevalcap.cider.cider import Cider

    from mue.evaluation.cider_d import CiderD

    refs = {"A": ["a b"], "B": ["c d"]}
    cider = CiderD.from_corpus(refs.values())
    # hyp "a": unigram cosine 1/sqrt(2), no bigrams..4-grams; length (in bigrams) 0 vs 1 -> exp(-1/72)
    expected = 10 * (2 ** -0.5) * math.exp(-1 / 72) / 4
    assert cider.score("a", refs["A"]) == pytest.approx(expected)
    assert cider.score("c d", refs["B"]) == pytest.approx(5.0)  # (1 + 1 + 0 + 0) / 4 * 10: no 3/4-grams

    refs = {"1": ["a man rides a horse on the beach", "a person riding a horse"],
            "2": ["a plate of food on a wooden table", "food on a white plate"],
            "3": ["a dog runs on the grass", "a brown dog on green grass"]}
    hyps = {"1": "a man riding a horse", "2": "a plate of food on a table", "3": "a dog on the beach"}
    cider = CiderD.from_corpus(refs.values())
    per_image = [cider.score(hyps[k], refs[k]) for k in refs]
    theirs, theirs_each = Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
    assert per_image == pytest.approx(list(theirs_each))
    assert sum(per_image) / len(per_image) == pytest.approx(theirs)
    # scoring one image alone keeps the split's document frequencies (a batch-local table would differ)
    assert CiderD.from_corpus([refs["1"]]).score(hyps["1"], refs["1"]) != pytest.approx(per_image[0])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no hypothesis"):
        cm.compute_caption_metrics({"1": "x"}, {"1": ["x"], "2": ["y"]}, metrics=("bleu",))
    with pytest.raises(ValueError, match="'1'.*non-empty list"):
        cm.compute_caption_metrics({"1": "x"}, {"1": []}, metrics=("bleu",))
    with pytest.raises(ValueError, match="unknown metric"):
        cm.compute_caption_metrics({"1": "x"}, {"1": ["x"]}, metrics=("bleu5",))


def test_spice_skipped_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(cm, "spice_available", lambda: False)
    monkeypatch.setattr(cm, "_SPICE_WARNED", False)
    hyps = {k: v[0] for k, v in REFS.items()}
    with caplog.at_level(logging.WARNING, logger=cm.logger.name):
        for _ in range(2):
            out = cm.compute_caption_metrics(hyps, REFS, metrics=("cider", "spice"), ptb_tokenize=False)
            assert "SPICE" not in out and out["CIDEr"] == pytest.approx(10.0)
    warnings = [r for r in caplog.records if "SPICE skipped" in r.getMessage()]
    assert len(warnings) == 1
    assert "stanford-corenlp-3.6.0.jar" in warnings[0].getMessage()


def test_results_collector_full_metric_set_and_cli(tmp_path, capsys):
    """The whole metric set (PTB tokenizer, METEOR's JVM) through the results file and the CLI."""
    res = cm.CaptionResults("test", expected=2)
    res.add("1", REFS["1"][0], REFS["1"])
    with pytest.raises(ValueError, match="1 of 2"):
        res.compute()
    with pytest.raises(ValueError, match="twice"):
        res.add("1", "x", ["y"])
    res.add("2", "two dogs run on grass", REFS["2"])
    assert res.complete
    scores = res.compute(metrics=("bleu", "meteor", "rouge", "cider"))
    assert set(scores) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert 0 < scores["METEOR"] < 1 and 0 < scores["CIDEr"] < 10
    path = tmp_path / "caption_test.json"
    path.write_text(json.dumps({"split": "test", "metrics": scores, "predictions": res.predictions()}))
    cli = cm.main(["--results", str(path), "--metrics", "bleu,cider", "--out", str(tmp_path / "s.json")])
    assert cli["CIDEr"] == pytest.approx(scores["CIDEr"])
    assert json.loads((tmp_path / "s.json").read_text())["Bleu_4"] == pytest.approx(scores["Bleu_4"])
    # separate hyps (COCO results list) and refs files
    (tmp_path / "h.json").write_text(json.dumps([{"image_id": 1, "caption": REFS["1"][0]},
                                                 {"image_id": 2, "caption": "two dogs run on grass"}]))
    (tmp_path / "r.json").write_text(json.dumps(REFS))
    cli2 = cm.main(["--hyps", str(tmp_path / "h.json"), "--refs", str(tmp_path / "r.json"), "--metrics", "cider"])
    assert cli2["CIDEr"] == pytest.approx(scores["CIDEr"])
