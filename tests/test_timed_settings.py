"""mue.benchmarks.timed_settings: speed-ups as medians of repeated, interleaved timings, and their table."""
import argparse
import json

import pytest

from mue.benchmarks import timed_settings
from mue.benchmarks.timed_settings import parse_setting, section, timing_table


def result(times_full, times_mue):
    ratios = [a / b for a, b in zip(times_full, times_mue)]
    return {"task": "caption", "n_examples": 500, "batch_size": 100, "repeats": len(times_full), "threads": 2,
            "device": "cpu", "settings": [
                {"thresholds": {"img_thres": 1.0, "txt_thres": 1.0, "dec_thres": 1.0}, "seconds": times_full,
                 "median_s": sorted(times_full)[1], "speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0},
                {"thresholds": {"img_thres": 0.99, "txt_thres": 0.99, "dec_thres": 0.99}, "seconds": times_mue,
                 "median_s": sorted(times_mue)[1], "speedup": sorted(ratios)[1], "speedup_low": min(ratios),
                 "speedup_high": max(ratios)}]}


def test_table_rows_and_spread():
    table = timing_table(result([3.0, 3.3, 3.1], [2.0, 2.4, 2.5]), ["full model", "MuE, chosen on dev for 99 %"])
    assert "| full model | img 1, txt 1, dec 1 | 3.10 | 3.00, 3.30, 3.10 | 1.00x [1.00, 1.00] |" in table
    assert "| MuE, chosen on dev for 99 % | img 0.99, txt 0.99, dec 0.99 | 2.40 | 2.00, 2.40, 2.50 | 1.38x [1.24, 1.50] |" \
        in table
    assert "3 timed rounds" in table and "500 caption examples" in table


def test_section_reads_every_timed_task(tmp_path):
    assert section(str(tmp_path / "none")) == {}
    timed_settings.write(result([3.0, 3.3, 3.1], [2.0, 2.4, 2.5]), str(tmp_path / "t" / "mue_caption.json"),
                         ["full model", "MuE"])
    (title, text), = section(str(tmp_path / "t")).items()
    assert title == timed_settings.SECTION_TITLE and text.startswith("### caption") and "| MuE |" in text
    assert json.load(open(tmp_path / "t" / "mue_caption.json"))["labels"] == ["full model", "MuE"]


def test_settings_are_three_thresholds():
    assert parse_setting("0.99,0.9,1") == {"img_thres": 0.99, "txt_thres": 0.9, "dec_thres": 1.0}
    with pytest.raises(argparse.ArgumentTypeError, match="IMG,TXT,DEC"):
        parse_setting("0.99,0.9")
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timed_settings.time_settings("x.pt", "x.tsv", [parse_setting("1,1,1")], repeats=0)
