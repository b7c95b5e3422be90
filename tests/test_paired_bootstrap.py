"""Paired bootstrap of two caption result records (mue.evaluation.paired_bootstrap)."""
import json
import random

import numpy as np
import pytest

from mue.evaluation.caption_metrics import compute_caption_metrics
from mue.evaluation.paired_bootstrap import (_bleu4, compare_records, main, paired_bootstrap, per_image_scores)

WORDS = "a red blue green circle square triangle two three shapes and of group small big".split()


def corpus(n=60, seed=0):
    rng = random.Random(seed)
    refs = {f"img{i}": [" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(4)] for i in range(n)}
    good = {k: r[0] for k, r in refs.items()}  # one of its own references
    bad = {k: " ".join(rng.choices(WORDS, k=5)) for k in refs}
    return refs, good, bad


def record(hyps, refs):
    return {"predictions": [{"uniq_id": k, "image_id": k, "caption": hyps[k], "refs": refs[k]} for k in refs]}


def test_full_set_figures_equal_pycocoevalcap():
    refs, good, bad = corpus()
    result = paired_bootstrap(bad, good, refs, rounds=200)
    for hyps, side in ((bad, "a"), (good, "b")):
        expected = compute_caption_metrics(hyps, refs, metrics=("bleu", "cider"), ptb_tokenize=False)
        assert result["CIDEr"][side] == pytest.approx(100 * expected["CIDEr"], abs=1e-9)
        assert result["Bleu_4"][side] == pytest.approx(100 * expected["Bleu_4"], abs=1e-9)


def test_a_round_is_the_corpus_bleu_of_its_draw():
    """BLEU-4 of a resample (images repeated) from summed statistics == pycocoevalcap on that resample."""
    refs, good, _ = corpus(20)
    ids = list(refs)
    draw = np.random.default_rng(3).integers(0, len(ids), size=len(ids))
    stats = per_image_scores(good, refs)["bleu"]
    drawn_refs = {f"{j}_{ids[i]}": refs[ids[i]] for j, i in enumerate(draw)}
    drawn_hyps = {f"{j}_{ids[i]}": good[ids[i]] for j, i in enumerate(draw)}
    expected = compute_caption_metrics(drawn_hyps, drawn_refs, metrics=("bleu",), ptb_tokenize=False)["Bleu_4"]
    assert _bleu4(stats[draw].sum(0)) == pytest.approx(expected, abs=1e-12)


def test_a_clear_gain_has_an_interval_above_zero_and_no_change_has_zero():
    refs, good, bad = corpus()
    gain = paired_bootstrap(bad, good, refs, rounds=500)
    for r in gain.values():
        assert r["diff"] > 0 and r["low"] > 0 and r["low"] <= r["diff"] <= r["high"] and r["p_not_better"] == 0
    loss = paired_bootstrap(good, bad, refs, rounds=500)
    assert loss["CIDEr"]["high"] < 0
    same = paired_bootstrap(good, dict(good), refs, rounds=200)
    assert all(r["diff"] == r["low"] == r["high"] == 0 for r in same.values())


def test_mixed_captions_give_an_interval_around_the_difference():
    refs, good, bad = corpus(80, seed=1)
    half = {k: (good[k] if i % 2 else bad[k]) for i, k in enumerate(refs)}
    other = {k: (bad[k] if i % 2 else good[k]) for i, k in enumerate(refs)}
    r = paired_bootstrap(half, other, refs, rounds=1000)["CIDEr"]
    assert r["low"] < r["diff"] < r["high"] and r["low"] < 0 < r["high"]  # a swap of equal halves: no clear winner


def test_records_must_cover_the_same_images_with_the_same_references():
    refs, good, bad = corpus(10)
    a = record(good, refs)
    b = record(bad, refs)
    b["predictions"] = b["predictions"][:-1]
    with pytest.raises(ValueError, match="different images"):
        compare_records(a, b, rounds=100)
    c = record(bad, refs)
    c["predictions"][0]["refs"] = ["something else"]
    with pytest.raises(ValueError, match="different references"):
        compare_records(a, c, rounds=100)
    with pytest.raises(ValueError, match="no per-image 'predictions'"):
        compare_records({"metrics": {}}, a, rounds=100)


def test_command_line_prints_the_table(tmp_path, capsys):
    refs, good, bad = corpus(30)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(record(bad, refs)))
    pb.write_text(json.dumps(record(good, refs)))
    main([str(pa), str(pb), "--rounds", "200"])
    out = capsys.readouterr().out
    assert "| CIDEr |" in out and "| BLEU-4 |" in out and "30 images, 200 rounds" in out
    with pytest.raises(SystemExit, match="missing.json"):
        main([str(pa), str(tmp_path / "missing.json")])


def test_stage_comparison_rows_and_report_section(tmp_path):
    from mue.evaluation.stage_comparison import SECTION_TITLE, compare_stages, section, write_comparison

    refs, good, bad = corpus(40)
    th = {"img_thres": 1.0, "txt_thres": 1.0, "dec_thres": 1.0}
    first, final = record(bad, refs), record(good, refs)
    final["thresholds"] = th
    comparison = compare_stages([("full model", first, final)], rounds=200)
    row = comparison["rows"][0]
    assert row["n_images"] == 40 and row["metrics"]["CIDEr"]["low"] > 0
    assert section(str(tmp_path / "stages")) == {}  # nothing written yet: no section
    write_comparison(str(tmp_path / "stages" / "mue_caption_mue.json"), "mue", comparison)
    text = section(str(tmp_path / "stages"))[SECTION_TITLE]
    c = row["metrics"]["CIDEr"]
    assert f"| mue | full model | img 1, txt 1, dec 1 | CIDEr | {c['a']:.1f} | {c['b']:.1f} | {c['diff']:+.1f} |" in text
    assert "40 images" in text
