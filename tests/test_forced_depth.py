"""mue.evaluation.forced_depth: the report's table of quality by forced depth (--exit-depth K records)."""
from mue.evaluation.forced_depth import depth_of, forced_depth_table, section
from mue.evaluation.sweep import record_path


def record(right, depth=0, flops=0.0):
    preds = [{"uniq_id": f"t{i}", "prediction": "yes" if ok else "no", "answer": "yes"} for i, ok in enumerate(right)]
    return {"task": "snli_ve", "run": "mue" if depth else "full", "split": "test", "n_examples": len(preds),
            "split_size": len(preds), "predictions": preds, "metrics": {"accuracy": sum(right) / len(right)},
            "thresholds": {"img_thres": 1.0, "txt_thres": 1.0, "dec_thres": 1.0, "exit_depth": depth},
            "exit": {"n_dec_layers": 3, "n_enc_layers": 3, "expected_time_reduction": 1 - (depth or 3) / 3,
                     "flops_reduction": flops, "wall_clock_s": 1.0}}


def cells(table):
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    return rows[0], {r[0]: r for r in rows[2:]}


def test_rows_by_depth_with_the_full_model_last():
    full = record([True] * 80 + [False] * 20)
    forced = [record([True] * 40 + [False] * 60, depth=1, flops=0.6), record([True] * 60 + [False] * 40, depth=2, flops=0.3)]
    header, rows = cells(forced_depth_table(forced, full, "snli_ve"))
    assert list(rows) == ["1", "2", "3"] and depth_of(full, 3) == 3
    assert rows["1"][header.index("% of full")] == "50.0" and rows["2"][header.index("% of full")] == "75.0"
    assert rows["3"][header.index("95 % interval")] == "[100.0, 100.0]"
    low, high = (float(x) for x in rows["1"][header.index("95 % interval")].strip("[]").split(","))
    assert low < 50.0 < high
    assert rows["1"][header.index("FLOPs red. (%)")] == "60.0"
    assert "Layer 2 keeps 75.0 % of the full model's accuracy" in forced_depth_table(forced, full, "snli_ve")
    assert forced_depth_table(forced, full, "caption") is None  # no records of that task


def test_section_reads_the_forced_depth_records(tmp_path):
    import json

    forced = tmp_path / "forced"
    forced.mkdir()
    full = record([True] * 8 + [False] * 2)
    one = record([True] * 5 + [False] * 5, depth=1)
    path = record_path(str(forced), "mue_snli_ve", "mue", "test", (1.0, 1.0, 1.0), ["--exit-depth", "1"])
    open(path, "w").write(json.dumps(one))
    text = section(str(forced), [full])
    (title, body), = text.items()
    assert title.startswith("Forced depth") and "### snli_ve" in body and "| 1 | 0.5000 | 62.5 |" in body
    assert section(str(tmp_path / "missing"), [full]) == {}
