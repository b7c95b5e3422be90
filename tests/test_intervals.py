"""mue.evaluation.intervals and the trade-off table's "95 % interval" column: paired bootstrap intervals
on a setting's quality as a share of the full model's."""
import numpy as np
import pytest

from mue.evaluation.intervals import per_example_quality, ratio_interval
from mue.evaluation.tables import tradeoff_table


def snli_record(run, answers_right, etr=0.0, thres=1.0):
    preds = [{"uniq_id": f"t{i}", "prediction": "yes" if ok else "no", "answer": "yes"}
             for i, ok in enumerate(answers_right)]
    return {"task": "snli_ve", "run": run, "split": "test", "n_examples": len(preds), "split_size": len(preds),
            "thresholds": {"img_thres": thres, "txt_thres": thres, "dec_thres": thres},
            "metrics": {"accuracy": float(np.mean(answers_right))}, "predictions": preds,
            "exit": {"expected_time_reduction": etr, "wall_clock_s": 1.0}}


def test_the_interval_is_the_percentiles_of_resampled_ratios():
    rng = np.random.default_rng(0)
    full = {f"t{i}": float(v) for i, v in enumerate(rng.random(50) < 0.8)}
    mine = {k: (v if i % 5 else 0.0) for i, (k, v) in enumerate(full.items())}  # every 5th example lost
    low, high = ratio_interval(mine, full, rounds=500, seed=3)
    # the same draws, one round at a time
    ids = sorted(full)
    a, b = np.array([full[i] for i in ids]), np.array([mine[i] for i in ids])
    draws = np.random.default_rng(3).integers(0, len(ids), size=(500, len(ids)))
    ratios = [b[d].sum() / a[d].sum() for d in draws]
    assert (low, high) == pytest.approx(tuple(np.percentile(ratios, [2.5, 97.5])))
    assert low < b.sum() / a.sum() < high < 1.0  # the losses are real: the whole interval is below 100 %
    assert ratio_interval(full, full) == (1.0, 1.0)


def test_no_interval_without_paired_per_example_scores():
    full = snli_record("full", [True, True, False])
    assert per_example_quality(full, "accuracy") == {"t0": 1.0, "t1": 1.0, "t2": 0.0}
    assert per_example_quality(full, "Bleu_4") is None  # not a mean over examples
    assert per_example_quality(dict(full, predictions=[]), "accuracy") is None
    other = {"u0": 1.0, "u1": 1.0, "u2": 0.0}  # other examples: nothing to pair
    assert ratio_interval(other, per_example_quality(full, "accuracy")) is None
    assert ratio_interval({"t0": 1.0}, {"t0": 0.0}) is None  # the full model scores 0


def test_caption_quality_per_image_averages_to_the_corpus_cider():
    from pycocoevalcap.cider.cider import Cider

    refs = [["a red square", "a red box"], ["two blue circles", "blue circles"], ["a green triangle", "a triangle"]]
    caps = ["a red square", "one blue circle", "a green square"]
    preds = [{"uniq_id": i, "caption": c, "refs": r} for i, (c, r) in enumerate(zip(caps, refs))]
    per = per_example_quality({"predictions": preds}, "CIDEr")
    corpus, _ = Cider().compute_score({str(i): r for i, r in enumerate(refs)}, {str(i): [c] for i, c in enumerate(caps)})
    assert set(per) == {"0", "1", "2"} and np.mean(list(per.values())) == pytest.approx(corpus)


def test_tradeoff_table_shows_the_interval_and_na_where_there_is_none():
    full = snli_record("full", [True] * 40 + [False] * 10)
    same = snli_record("mue", [True] * 40 + [False] * 10, etr=0.3, thres=0.9)
    worse = snli_record("mue", [True] * 30 + [False] * 20, etr=0.6, thres=0.7)
    bare = dict(snli_record("mue", [True] * 50, etr=0.5, thres=0.8), predictions=None)
    lines = tradeoff_table([full, same, worse, bare], "snli_ve").splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {c[header.index("time red. (%)")]: c for c in
            ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    col = header.index("95 % interval")
    assert rows["0.0"][col] == rows["30.0"][col] == "[100.0, 100.0]"
    low, high = (float(x) for x in rows["60.0"][col].strip("[]").split(","))
    assert low < 75.0 < high < 100.0  # 30 of 40 right answers kept: 75 %
    assert rows["50.0"][col] == "n/a"
