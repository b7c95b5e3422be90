"""Smoke tests of scripts/bench_inference.py and scripts/bench_train.py at their --quick setting.

Each script runs in a subprocess, as a user would run it; the tests check the header, the markdown
table's columns and rows and the JSON rows, never the timings (they depend on the machine).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run_script(name, *args):
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def table(stdout):
    """The markdown table in stdout: (header cells, list of row cell lists)."""
    lines = [l for l in stdout.splitlines() if l.startswith("|")]
    assert len(lines) >= 3, f"no markdown table in:\n{stdout}"
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    assert set(lines[1].replace("|", "")) == {"-"}, "second table line is not the separator"
    return cells[0], cells[2:]


def check_header(stdout, script, *options):
    """The exact command line and the machine info come first."""
    command = next(l for l in stdout.splitlines() if l.startswith("command: "))
    assert " ".join([f"scripts/{script} --quick --threads 1", *options, "--json"]) in command
    machine = next(l for l in stdout.splitlines() if l.startswith("machine: "))
    assert "threads" in machine and "CPUs" in machine


def test_bench_inference_quick(tmp_path):
    out = tmp_path / "inference.json"
    stdout = run_script("bench_inference.py", "--quick", "--threads", "1", "--memory", "--json", str(out))
    check_header(stdout, "bench_inference.py", "--memory")
    header, rows = table(stdout)
    data = json.loads(out.read_text())
    assert header == data["columns"]
    for column in ("time_s", "spread", "img_layers", "txt_layers", "dec_layers", "gflops", "speedup_measured",
                   "speedup_flops", "efficiency", "vs_per_row_measured", "vs_per_row_flops", "overhead",
                   "syncs_per_step", "peak_mem_gb"):
        assert column in header
    configs = ("full_per_row", "full", "bookkeeping", "mue")
    keys = [(r[header.index("task")], r[header.index("config")]) for r in rows]
    assert keys == [(t, c) for t in ("caption", "snli_ve") for c in configs]
    assert all(r[header.index("size")] == "micro" for r in rows)
    assert len(data["rows"]) == len(rows)
    by = {(r["task"], r["config"]): r for r in data["rows"]}
    for row in data["rows"]:
        assert row["time_min_s"] <= row["time_s"] <= row["time_max_s"] and row["peak_mem_gb"] > 0
        assert 1 <= row["img_layers"] <= 6 and 1 <= row["dec_layers"] <= 6
        full = by[(row["task"], "full")]
        if row["config"] == "bookkeeping":  # thresholds 1.0: nothing exits, the full model's FLOPs
            assert row["img_layers"] == row["txt_layers"] == row["dec_layers"] == 6
            assert row["speedup_flops"] == pytest.approx(1.0) and row["gflops"] == pytest.approx(full["gflops"])
            assert "overhead" in row and "goal" in row
        if row["config"] in ("bookkeeping", "mue"):
            assert row["syncs_per_step"] >= 0
            assert row["efficiency"] == pytest.approx(row["speedup_measured"] / row["speedup_flops"])
        if row["config"] == "mue":
            assert row["gflops"] < full["gflops"]
    for task in ("caption", "snli_ve"):  # per-row copies of each source cost cross keys/values per row
        assert by[(task, "full_per_row")]["gflops"] > by[(task, "full")]["gflops"]


def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.json"
    stdout = run_script("bench_train.py", "--quick", "--threads", "1", "--modes", "mue,last_layer,mue_drop_worst",
                        "--json", str(out))
    check_header(stdout, "bench_train.py", "--modes", "mue,last_layer,mue_drop_worst")
    header, rows = table(stdout)
    data = json.loads(out.read_text())
    assert header == data["columns"]
    for column in ("step_s", "spread", "rss_build_mb", "peak_rss_mb", "step_mem_mb", "time_ratio", "paired_ratio",
                   "mem_ratio", "peak_ratio"):
        assert column in header
    assert [(r[header.index("size")], r[header.index("criterion")]) for r in rows] == [
        ("micro", "mue"), ("micro", "last_layer"), ("micro", "mue_drop_worst")]
    # the configurations take turns: one line per round, every configuration in each, order alternating
    rounds = [l for l in stdout.splitlines() if l.startswith("<!-- micro round")]
    assert len(rounds) == 2 and "(warm-up)" in rounds[0] and "(warm-up)" not in rounds[1]
    order = [re.findall(r"(\w+) [0-9.]+s", line.split(":", 1)[1]) for line in rounds]
    assert order == [["mue", "last_layer", "mue_drop_worst"], ["mue_drop_worst", "last_layer", "mue"]]
    mue_row, last_row, drop_row = data["rows"]
    for row in data["rows"]:
        assert len(row["step_times_s"]) == 1 and row["step_min_s"] <= row["step_s"] <= row["step_max_s"]
        assert row["peak_rss_mb"] > 0 and row["loss"] > 0
    assert mue_row["time_ratio"] == pytest.approx(mue_row["step_s"] / last_row["step_s"])
    assert mue_row["paired_ratio"] == pytest.approx(mue_row["step_times_s"][0] / last_row["step_times_s"][0])
    assert "time_ratio" not in last_row and "time_ratio" in drop_row
    assert drop_row["loss"] < mue_row["loss"]  # the same batch without each layer's worst 20 % of tokens


def test_bench_train_goals():
    from mue.benchmarks import bench_train

    def rows(image, mue_s, mem):
        return [{"size": "base", "criterion": "mue", "image": image, "step_s": mue_s, "step_times_s": [mue_s],
                 "step_mem_mb": mem, "peak_rss_mb": 1000.0 + mem},
                {"size": "base", "criterion": "last_layer", "image": image, "step_s": 1.0, "step_times_s": [1.0],
                 "step_mem_mb": 100.0, "peak_rss_mb": 1100.0}]

    met = rows(128, 1.5, 105.0)
    bench_train.add_ratios(met)
    assert met[0]["goal_met"] and met[0]["goal"] == "time <= 1.6x: met; memory <= 1.1x: met"
    missed = rows(480, 1.2, 120.0)
    bench_train.add_ratios(missed)
    assert not missed[0]["goal_met"] and missed[0]["goal"] == "time <= 1.1x: MISSED; memory <= 1.1x: MISSED"
    other = rows(256, 9.0, 100.0)
    bench_train.add_ratios(other)
    assert other[0]["goal_met"] and other[0]["goal"].startswith("(no time goal at 256 px)")
    with pytest.raises(SystemExit, match="--modes"):
        bench_train.parse_args(["--modes", "mue,full"])


def test_per_size_options():
    from mue.benchmarks import bench_inference
    args = bench_inference.parse_args(["--sizes", "micro,base", "--img-thres", "micro=0.7,base=0.9",
                                       "--image-size", "48"])
    assert args.img_thres == {"micro": 0.7, "base": 0.9}
    assert args.image_size == {"micro": 48, "base": 48}
    with pytest.raises(SystemExit, match="--img-thres"):
        bench_inference.parse_args(["--sizes", "micro", "--img-thres", "huge=0.9"])
    with pytest.raises(SystemExit, match="no value for size"):
        bench_inference.parse_args(["--sizes", "micro,base", "--dec-thres", "micro=0.9"])
    with pytest.raises(SystemExit, match="--tasks"):
        bench_inference.parse_args(["--tasks", "vqa"])
