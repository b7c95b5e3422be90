"""Trade-off reports (mue.evaluation.report, records, tables, plots) and the Pareto front, on hand-made
result records."""
import json
import random

import pytest

from mue.evaluation.pareto import pareto_front
from mue.evaluation.plots import plot_tradeoff
from mue.evaluation.records import (
    NoSettingMeetsTarget,
    find_baseline,
    format_thresholds,
    load_records,
    quality_key,
    same_thresholds,
    select_for_target,
)
from mue.evaluation.report import main, render_report
from mue.evaluation.tables import SINGLE_TIMING, ablation_table, decomposition_table, target_table, tradeoff_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(run, img=1.0, txt=1.0, dec=1.0, q=1.0, etr=0.0, flops=None, wall=None, n=100,
        task="caption", split="test", layers=(6.0, 6.0, 6.0), schedule="decay", split_size=None):
    key = "CIDEr" if task == "caption" else "accuracy"
    return {
        "task": task, "run": run, "split": split,
        "thresholds": {"img_thres": img, "txt_thres": txt, "dec_thres": dec, "dec_schedule": schedule,
                       "dec_decay_beta": 0.95, "dec_decay_tau": 1.0, "kv_policy": "copy"},
        "metrics": {key: q},
        "n_examples": n, "split_size": n if split_size is None else split_size,
        "exit": {"mean_image_layers": layers[0], "mean_text_layers": layers[1],
                 "mean_decoder_layers": layers[2], "expected_time_reduction": etr,
                 "flops_reduction": flops, "wall_clock_s": wall, "n_enc_layers": 6, "n_dec_layers": 6},
    }


def parse_table(md, first_header):
    """Rows (dicts header -> cell) of the markdown table whose first header is ``first_header``."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def caption_records():
    return [
        rec("mue", 0.9, 0.9, 0.9, q=1.10, etr=0.5, flops=0.45, wall=2.5, n=50, layers=(3.0, 2.5, 3.2)),
        rec("full", q=1.20, etr=0.0, flops=0.0, wall=10.0, n=100),
        rec("mue", 0.95, 1.0, 0.95, q=1.188, etr=0.3, flops=0.25, wall=7.5, n=100, layers=(4.0, 6.0, 4.5)),
        rec("mue", 0.97, 1.0, 1.0, q=1.00, etr=0.2, flops=0.1, wall=9.0, n=100, layers=(5.0, 6.0, 6.0)),
    ]


# ------------------------------------------------------------------------------------ pareto
def test_pareto_front_crafted():
    pts = [(0.0, 1.0), (0.2, 0.99), (0.1, 0.98), (0.3, 0.99), (0.3, 0.99), (0.5, 0.8), (0.4, 0.7)]
    # (0.2,.99) < (0.3,.99); (0.1,.98) < (0.2,.99); (0.4,.7) < (0.5,.8); duplicates both kept
    assert pareto_front(pts) == [0, 3, 4, 5]
    assert pareto_front([]) == []
    assert pareto_front([(0.1, 0.5)]) == [0]


def test_pareto_front_definition_on_random_points():
    rng = random.Random(0)
    pts = [(rng.randint(0, 8) / 8, rng.randint(0, 8) / 8) for _ in range(60)]
    front = set(pareto_front(pts))

    def dom(a, b):
        return a[0] >= b[0] and a[1] >= b[1] and a != b

    for i, p in enumerate(pts):
        assert (i in front) == (not any(dom(q, p) for q in pts))
    assert 0 < len(front) < len(pts)


def test_pareto_front_rejects_bad_points():
    with pytest.raises(ValueError, match="point 1"):
        pareto_front([(0, 1), (float("nan"), 1)])
    with pytest.raises(ValueError, match="point 0"):
        pareto_front([(1, 2, 3)])


# ------------------------------------------------------------------------------- trade-off
def test_quality_key():
    assert quality_key("caption") == "CIDEr"
    assert quality_key("snli_ve") == "accuracy"
    assert quality_key("caption", "BLEU-4") == "BLEU-4"
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        quality_key("vqa")


def test_tradeoff_table_numbers():
    rows = parse_table(tradeoff_table(caption_records(), "caption"), "run")
    assert [float(r["time red. (%)"]) for r in rows] == [0.0, 20.0, 30.0, 50.0]  # sorted by reduction
    by_red = {float(r["time red. (%)"]): r for r in rows}
    full, worse, good, fast = by_red[0.0], by_red[20.0], by_red[30.0], by_red[50.0]
    assert full["run"] == "full" and float(full["% of full"]) == pytest.approx(100.0)
    assert float(good["CIDEr"]) == pytest.approx(1.188)
    assert float(good["% of full"]) == pytest.approx(99.0, abs=0.05)
    assert float(fast["% of full"]) == pytest.approx(100 * 1.10 / 1.20, abs=0.05)
    assert float(good["FLOPs red. (%)"]) == pytest.approx(25.0)
    # speedup per example: full 10 s / 100, good 7.5 s / 100, fast 2.5 s / 50
    assert float(good[SINGLE_TIMING]) == pytest.approx(10 / 7.5, abs=0.005)
    assert float(fast[SINGLE_TIMING]) == pytest.approx(0.1 / 0.05, abs=0.005)
    assert float(fast["image L"]) == pytest.approx(3.0) and float(fast["text L"]) == pytest.approx(2.5)
    assert float(fast["decoder L"]) == pytest.approx(3.2)
    assert "img 0.9" in fast["thresholds"] and "decay" in fast["thresholds"]
    # (20 %, 1.00) is dominated by (30 %, 1.188); the rest form the front
    assert [r["Pareto"] for r in (full, worse, good, fast)] == ["*", "", "*", "*"]


def test_tradeoff_table_missing_values_and_subset_note():
    recs = [rec("full", q=0.8, task="snli_ve"),
            rec("mue", 0.9, 0.9, 0.9, q=0.78, etr=0.4, n=40, split_size=100, task="snli_ve")]
    md = tradeoff_table(recs, "snli_ve")
    rows = parse_table(md, "run")
    assert rows[1][SINGLE_TIMING] == "n/a" and rows[1]["FLOPs red. (%)"] == "n/a"
    assert float(rows[1]["% of full"]) == pytest.approx(97.5)
    assert "(40/100)" in md


def test_baseline_fallback_and_errors():
    # no run named "full": the single never-exit record is the baseline (documented fallback)
    recs = [rec("mue", q=1.0), rec("mue", 0.9, 0.9, 0.9, q=0.9, etr=0.4)]
    assert find_baseline(recs, "caption") is recs[0]
    rows = parse_table(tradeoff_table(recs, "caption"), "run")
    assert float(rows[1]["% of full"]) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="no full-model record"):
        tradeoff_table(recs[1:], "caption")
    with pytest.raises(ValueError, match="several never-exit records"):
        find_baseline(recs + [rec("w/o decomposition", q=0.95)], "caption")
    with pytest.raises(ValueError, match="no result records for task 'snli_ve'"):
        tradeoff_table(recs, "snli_ve")
    with pytest.raises(ValueError, match="mix splits"):
        tradeoff_table(recs + [rec("full", split="valid")], "caption")
    assert find_baseline(recs + [rec("full", split="valid")], "caption", split="valid")["split"] == "valid"
    bad = rec("full")
    bad["metrics"] = {"BLEU-4": 0.3}
    with pytest.raises(ValueError, match="CIDEr"):
        tradeoff_table([bad], "caption")


def test_decomposition_table():
    recs = caption_records() + [rec("w/o decomposition", 0.9, 0.9, 0.9, q=1.0, etr=0.3, layers=(None, None, 4.0))]
    md = decomposition_table(recs, "caption")
    rows = parse_table(md, "run")
    assert len(rows) == 4  # the joint-encoder record has no per-stream depths
    assert "No per-stream depths" in md and "w/o decomposition" in md
    mue = [r for r in rows if r["run"] == "mue"]
    assert [float(r["image L"]) for r in mue] == [5.0, 4.0, 3.0]
    assert float(mue[2]["text L"]) == pytest.approx(2.5)
    assert float(mue[1]["% of full"]) == pytest.approx(99.0, abs=0.05)


# ------------------------------------------------------------------------- target selection
def dev_and_test():
    dev = [rec("full", q=1.0, split="valid"),
           rec("mue", 0.99, 1, 1, q=0.995, etr=0.2, split="valid"),
           rec("mue", 0.95, 0.95, 0.9, q=0.991, etr=0.35, split="valid"),
           rec("mue", 0.9, 0.9, 0.9, q=0.95, etr=0.5, split="valid"),
           rec("mue", 0.93, 0.9, 0.9, q=0.985, etr=0.4, split="valid")]
    test = [rec("full", q=1.2, wall=10.0),
            rec("mue", 0.95, 0.95, 0.9, q=1.17, etr=0.33, flops=0.3, wall=5.0),
            rec("mue", 0.9, 0.9, 0.9, q=1.1, etr=0.48, flops=0.4, wall=4.0)]
    return dev, test


def test_select_for_target_picks_largest_reduction_meeting_target():
    dev, test = dev_and_test()
    s = select_for_target(dev, test, "caption", target=0.99)
    assert same_thresholds(s["thresholds"], {**dev[2]["thresholds"]})
    assert s["dev_quality"] == pytest.approx(0.991) and s["dev_expected_time_reduction"] == pytest.approx(0.35)
    assert s["test_quality"] == pytest.approx(1.17)
    assert s["test_quality_ratio"] == pytest.approx(1.17 / 1.2)
    assert s["test_expected_time_reduction"] == pytest.approx(0.33)
    assert s["test_speedup"] == pytest.approx(2.0)
    s95 = select_for_target(dev, test, "caption", target=0.95)
    assert s95["test_quality"] == pytest.approx(1.1)
    with pytest.raises(NoSettingMeetsTarget, match="99.9%"):
        select_for_target(dev, test, "caption", target=0.999)


def test_select_for_target_errors_without_test_match():
    dev, test = dev_and_test()
    with pytest.raises(ValueError, match="no test record.*img 0.95, txt 0.95, dec 0.9"):
        select_for_target(dev, [test[0], test[2]], "caption", target=0.99)
    # a different schedule is a different setting
    other = rec("mue", 0.95, 0.95, 0.9, q=1.17, etr=0.33, schedule="constant")
    with pytest.raises(ValueError, match="no test record"):
        select_for_target(dev, [test[0], other], "caption", target=0.99)


def test_target_table():
    dev, test = dev_and_test()
    rows = parse_table(target_table(dev, test, "caption", targets=(0.99, 0.95, 0.999)), "target (%)")
    assert [r["target (%)"] for r in rows] == ["99.0", "95.0", "99.9"]
    assert float(rows[0]["test CIDEr"]) == pytest.approx(1.17)
    assert float(rows[0]["test % of full"]) == pytest.approx(97.5)
    assert float(rows[1]["time red. (%)"]) == pytest.approx(48.0)
    assert rows[2]["thresholds"].startswith("none") and rows[2]["test CIDEr"] == "n/a"


def test_same_thresholds_defaults():
    assert same_thresholds({"img_thres": 0.9}, {"img_thres": 0.9, "kv_policy": "copy", "dec_thres": 1.0})
    assert not same_thresholds({"img_thres": 0.9}, {"img_thres": 0.91})
    # records written before --dec-decay-len existed decayed over 16 steps: the default fills it in
    old = rec("mue", dec=0.9)["thresholds"]
    assert same_thresholds(old, {**old, "dec_decay_len": 16})
    assert not same_thresholds(old, {**old, "dec_decay_len": 20})


def test_format_thresholds_shows_the_schedule_and_its_length():
    old = rec("mue", 0.9, 1.0, 0.8)["thresholds"]  # no dec_decay_len: the default N
    assert format_thresholds(old) == "img 0.9, txt 1, dec 0.8 decay(b0.95,t1,N16)"
    assert format_thresholds({**old, "dec_schedule": "reference", "dec_decay_len": 20, "kv_policy": "drop"}) \
        == "img 0.9, txt 1, dec 0.8 reference(b0.95,t1,N20), kv drop"
    assert format_thresholds({**old, "dec_schedule": "constant"}) == "img 0.9, txt 1, dec 0.8"
    assert format_thresholds({**old, "dec_thres": 1.0}) == "img 0.9, txt 1, dec 1"  # never exits: no schedule
    assert format_thresholds({"img_thres": 0.9, "seed": 3}) == "img 0.9, txt 1, dec 1, seed 3"


# ------------------------------------------------------------------------------- ablations
def test_ablation_table():
    recs = [rec("full", q=1.0),
            rec("mue", q=1.0), rec("mue", 0.9, 0.9, 0.9, q=0.992, etr=0.3),
            rec("mue", 0.8, 0.8, 0.8, q=0.97, etr=0.5), rec("mue", 0.7, 0.7, 0.7, q=0.9, etr=0.6),
            rec("w/o layer-wise loss", q=0.98), rec("w/o layer-wise loss", 0.9, 0.9, 0.9, q=0.975, etr=0.1),
            rec("w/o layer-wise loss", 0.8, 0.8, 0.8, q=0.95, etr=0.2),
            rec("w/o decomposition", 0.9, 0.9, 0.9, q=0.995, etr=0.15)]
    rows = {r["run"]: r for r in parse_table(ablation_table(recs, "caption"), "run")}
    assert list(rows) == ["full", "mue", "w/o layer-wise loss", "w/o decomposition"]
    m = rows["mue"]
    assert float(m["time red. (%) at >= 99%"]) == pytest.approx(30.0)
    assert float(m["time red. (%) at >= 96%"]) == pytest.approx(50.0)
    assert float(m["CIDEr at >= 99%"]) == pytest.approx(0.992)
    assert float(m["CIDEr at >= 96%"]) == pytest.approx(0.97)
    w = rows["w/o layer-wise loss"]
    assert w["reference"] == "own" and float(w["ref. CIDEr"]) == pytest.approx(0.98)
    assert float(w["time red. (%) at >= 99%"]) == pytest.approx(10.0)  # 0.975 >= 0.99 * 0.98
    assert float(w["time red. (%) at >= 96%"]) == pytest.approx(20.0)
    d = rows["w/o decomposition"]  # no never-exit record of its own: the full model's
    assert d["reference"] == "full model" and float(d["max CIDEr"]) == pytest.approx(0.995)


# ----------------------------------------------------------------------------------- plots
@pytest.mark.parametrize("x", ["expected_time_reduction", "speedup"])
def test_plot_tradeoff_writes_png(tmp_path, x):
    recs = caption_records() + [rec("w/o decomposition", 0.9, 0.9, 0.9, q=1.05, etr=0.4, wall=6.0)]
    path = plot_tradeoff(recs, "caption", str(tmp_path / "sub" / f"{x}.png"), x=x)
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_plot_tradeoff_errors():
    recs = [rec("full", q=1.0, wall=1.0), rec("mue", 0.9, 0.9, 0.9, q=0.9, etr=0.3)]
    with pytest.raises(ValueError, match="wall-clock"):
        plot_tradeoff(recs, "caption", "unused.png", x="speedup")
    with pytest.raises(ValueError, match="x must be one of"):
        plot_tradeoff(recs, "caption", "unused.png", x="flops")


# ----------------------------------------------------------------------- loading and CLI
def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_load_records(tmp_path):
    recs = caption_records()
    write(tmp_path / "a.json", recs[:2])
    write(tmp_path / "b.json", recs[2])
    (tmp_path / "notes.txt").write_text("not json")
    loaded = load_records(tmp_path)
    assert len(loaded) == 3
    assert loaded[0]["_source"].endswith("a.json[0]") and loaded[2]["_source"].endswith("b.json")
    assert loaded[2]["metrics"] == recs[2]["metrics"]
    assert len(load_records([tmp_path / "a.json", tmp_path / "b.json"])) == 3


def test_load_records_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"task": "caption",\n "run": }')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON \(line 2"):
        load_records(tmp_path)
    r = rec("full")
    del r["exit"]
    write(tmp_path / "broken.json", [rec("full"), r])
    with pytest.raises(ValueError, match=r"broken\.json\[1\]: result record lacks 'exit'"):
        load_records(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_records(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.json result files in directory .*empty_dir"):
        load_records(tmp_path / "empty_dir")


def test_render_report_and_cli(tmp_path, capsys):
    results, dev_dir, out = tmp_path / "test", tmp_path / "dev", tmp_path / "out"
    results.mkdir(), dev_dir.mkdir()
    dev, test = dev_and_test()
    snli = [rec("full", q=0.9, task="snli_ve"), rec("mue", 0.9, 0.9, 0.9, q=0.89, etr=0.4, task="snli_ve")]
    write(results / "caption.json", test)
    write(results / "snli.json", snli)
    write(dev_dir / "caption.json", dev)
    assert main([str(results), "--out", str(out), "--dev-dir", str(dev_dir), "--target", "0.99"]) == 0
    printed = capsys.readouterr().out
    assert "## caption (test)" in printed and "## snli_ve (test)" in printed
    assert parse_table(printed, "run")[1]["CIDEr"] == "1.1700"
    report = (out / "report.md").read_text()
    for part in ("### Quality vs cost", "### Image depth vs text depth", "### Runs (ablations)",
                 "### Thresholds chosen on dev, reported on test"):
        assert part in report
    for png in ("caption_test_expected_time_reduction.png", "caption_test_speedup.png",
                "snli_ve_test_expected_time_reduction.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    # SNLI-VE records carry no wall-clock: the speedup plot is not drawn, and the report says why
    assert not (out / "snli_ve_test_speedup.png").exists()
    assert "Speedup plot not drawn" in report
    headline = render_report(snli, str(tmp_path / "out2"), title="T")
    assert "accuracy" in headline and (tmp_path / "out2" / "report.md").read_text().startswith("# T")


def test_target_table_with_a_zero_quality_full_model_says_na():
    """A full model that scores 0 (an untrained smoke run) must not crash the report."""
    def rec(split, th, q, etr):
        return {"task": "caption", "run": "full" if th == 1.0 else "mue", "split": split,
                "thresholds": {"img_thres": th, "txt_thres": th, "dec_thres": th},
                "metrics": {"CIDEr": q}, "n_examples": 4, "split_size": 4,
                "exit": {"expected_time_reduction": etr, "wall_clock_s": 1.0, "flops_reduction": etr}}

    dev = [rec("valid", 1.0, 0.0, 0.0), rec("valid", 0.9, 0.0, 0.3)]
    test = [rec("test", 1.0, 0.0, 0.0), rec("test", 0.9, 0.0, 0.3)]
    table = target_table(dev, test, "caption", targets=(0.99,))
    assert "n/a" in table and "0.0000" in table


def test_every_printout_writes_a_saving_as_a_positive_time_reduction():
    """One convention, the paper's ("time reduction 40.2 %"), in the exit summary, sweep lines, the CLI's
    and the HTML page's lines; no printer negates a reduction or prints a signed percentage."""
    import glob
    import os
    import re
    from types import SimpleNamespace

    import torch

    from mue.__main__ import _line
    from mue.evaluation.sweep import summary_line
    from mue.exiting import ExitStats
    from mue.exiting.stats import reduction_text
    from mue.visualize import _stats

    assert reduction_text(0.402) == "40.2 %" and reduction_text(-0.05) == "-5.0 %" and reduction_text(None) == "n/a"
    stats = ExitStats(6, 6)  # encoder 4.5 of 6 layers, decoder 3 of 6: Eq. 14 = 1 - (0.75 + 0.5) / 2
    stats.add_encoder(torch.tensor([2, 6]), torch.tensor([4, 6]), 4, torch.tensor([2, 2]))
    stats.add_decoder(torch.tensor([1, 2, 6]))
    assert "expected time reduction (Eq. 14): 37.5 %" in stats.format_table()
    assert "time reduction 66.7 %;" in summary_line(rec("mue", q=1.1, etr=0.667, wall=2.0))
    exits = SimpleNamespace(image_layers=3, text_layers=4, encoder_layers=6, mean_decoder_layers=3.0,
                            decoder_layers=6, expected_time_reduction=0.402, flops_reduction=0.147, flops=8.53e6,
                            flops_full=1e7, seconds=0.01)
    line = _line(SimpleNamespace(source="a.png", text="a red square", exits=exits))
    assert "time reduction 40.2 % (Eq. 14), FLOPs reduction 14.7 %" in line
    assert "expected time reduction 40.2 % (Eq. 14)" in _stats(exits) and "FLOPs reduction 14.7 %" in _stats(exits)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "mue", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(root, "scripts", "*.py")):
        text = open(path, encoding="utf-8").read()
        bad = re.findall(r"-100(?:\.0)? ?\*[^\n]*|\{[^}\n]*:\+\.\d+f\} ?%", text)
        assert not bad, f"{path}: a reduction printed with another sign convention: {bad}"


def test_flops_breakdown_names_the_share_exits_can_skip():
    from mue.evaluation.tables import flops_breakdown_table

    full = rec("full", 1.0, 1.0, 1.0, q=0.9, etr=0.0)
    full["exit"]["flops_by_component"] = {
        "resnet_stem": {"spent": 50e9, "full": 50e9}, "encoder_image": {"spent": 10e9, "full": 10e9},
        "encoder_text": {"spent": 5e9, "full": 5e9}, "cross_kv": {"spent": 5e9, "full": 5e9},
        "decoder_layers": {"spent": 25e9, "full": 25e9}, "output_projection": {"spent": 5e9, "full": 5e9},
        "exit_classifier": {"spent": 0, "full": 0}}
    text = flops_breakdown_table([full, rec("mue", 0.9, 0.9, 0.9, q=0.85, etr=0.3)], "caption")
    assert "| resnet_stem | 50.000 | 50.0 |" in text and "exit_classifier" not in text  # zero rows left out
    assert "decoder layers) are 40.0 % of the full model's FLOPs" in text  # 10 + 5 + 25 of 100
    del full["exit"]["flops_by_component"]
    assert flops_breakdown_table([full], "caption") == "No FLOP breakdown in the full model's record."
