"""Learn-then-Test calibration of the exit thresholds (mue.evaluation.calibration, python -m mue.calibrate),
on hand-made records whose per-example losses are known."""
import json
import math

import numpy as np
import pytest

from mue import calibrate as cli
from mue.evaluation import calibration as cal


def record(run, setting, answers, etr, task="snli_ve", split="valid", refs=None):
    """A result record whose predictions are `answers` (one per example, ids 0..n-1)."""
    img, txt, dec = setting
    key = "prediction" if task == "snli_ve" else "caption"
    rows = [{"uniq_id": str(i), key: a} | ({"refs": refs[i]} if refs else {}) for i, a in enumerate(answers)]
    return {"task": task, "run": run, "split": split,
            "thresholds": {"img_thres": img, "txt_thres": txt, "dec_thres": dec},
            "metrics": {"accuracy" if task == "snli_ve" else "CIDEr": 0.5},
            "exit": {"expected_time_reduction": etr}, "predictions": rows}


def flipped(answers, k):
    """`answers` with the first k changed."""
    return [("no" if a == "yes" else "yes") if i < k else a for i, a in enumerate(answers)]


N = 400
FULL_ANSWERS = ["yes" if i % 3 else "no" for i in range(N)]


def snli_records():
    """Testing order by threshold sum: A (0.99s), B (0.95s), C (0.9s), D (0.7s).
    Risks: A 0, B 1 %, C 30 % (fails), D 0 but cheapest: never tested, because C failed first."""
    return [record("full", (1.0, 1.0, 1.0), FULL_ANSWERS, 0.0),
            record("mue", (0.99, 0.99, 0.99), FULL_ANSWERS, 0.1),
            record("mue", (0.95, 0.95, 0.95), flipped(FULL_ANSWERS, 4), 0.3),
            record("mue", (0.9, 0.9, 0.9), flipped(FULL_ANSWERS, 120), 0.5),
            record("mue", (0.7, 0.7, 0.7), FULL_ANSWERS, 0.8)]


def test_hoeffding_bentkus_pvalue_is_valid_at_the_boundary_of_the_null():
    """Losses drawn with risk exactly epsilon: P(p <= delta) must not exceed delta (Monte Carlo)."""
    rng = np.random.default_rng(0)
    n, epsilon, delta = 200, 0.1, 0.1
    means = rng.binomial(n, epsilon, size=4000) / n
    rejected = np.mean([cal.hoeffding_bentkus_pvalue(m, n, epsilon) <= delta for m in means])
    assert rejected <= delta
    # and it is not vacuous: a clearly lower risk is certified
    assert cal.hoeffding_bentkus_pvalue(0.02, n, epsilon) < 0.01


def test_pvalue_matches_its_definition():
    n, eps = 100, 0.05
    hoeffding = 0.95 ** 100  # risk_hat 0: exp(-n KL(0 || eps)) = (1 - eps)^n
    bentkus = math.e * 0.95 ** 100
    assert cal.hoeffding_bentkus_pvalue(0.0, n, eps) == pytest.approx(min(hoeffding, bentkus))
    assert cal.hoeffding_bentkus_pvalue(0.06, n, eps) == 1.0
    with pytest.raises(ValueError, match="epsilon"):
        cal.hoeffding_bentkus_pvalue(0.0, n, 1.5)


def test_testing_order_is_fixed_by_the_thresholds_alone():
    order = cal.testing_order([(0.9, 0.9, 0.9), (1.0, 0.7, 1.0), (0.99, 0.99, 0.99), (0.9, 0.9, 0.9)])
    assert order == [(0.99, 0.99, 0.99), (1.0, 0.7, 1.0), (0.9, 0.9, 0.9)]


def test_chooses_the_cheapest_setting_that_passes_and_stops_at_the_first_failure():
    result = cal.calibrate_records(snli_records(), "snli_ve", epsilon=0.05, delta=0.1)
    assert [t.setting for t in result.tested] == [(0.99, 0.99, 0.99), (0.95, 0.95, 0.95), (0.9, 0.9, 0.9)]
    assert [t.passed for t in result.tested] == [True, True, False]
    assert [t.risk for t in result.tested] == pytest.approx([0.0, 0.01, 0.3])
    assert result.chosen == (0.95, 0.95, 0.95) and not result.fell_back


def test_only_the_tested_settings_are_evaluated():
    calls = []

    def losses_of(s):
        calls.append(s)
        return np.ones(50) if s[0] < 0.95 else np.zeros(50), 1 - s[0]

    tested = cal.fixed_sequence_test([(0.99,) * 3, (0.9,) * 3, (0.8,) * 3], losses_of, 0.1, 0.1)
    assert calls == [(0.99,) * 3, (0.9,) * 3] and len(tested) == 2


def test_nothing_passes_when_the_guarantee_is_too_tight_and_it_falls_back_to_the_full_model():
    few = [dict(r, predictions=r["predictions"][:20]) for r in snli_records()]
    result = cal.calibrate_records(few, "snli_ve", epsilon=0.01, delta=0.01)
    assert result.fell_back and result.chosen == (1.0, 1.0, 1.0)
    assert len(result.tested) == 1 and not result.tested[0].passed


def test_cider_loss_marks_captions_that_fall_below_the_share_of_the_full_models():
    refs = [["a red circle left of a blue square", "a red circle and a blue square"],
            ["two green triangles", "a pair of green triangles"],
            ["a yellow star", "one yellow star"]]
    full_caps = ["a red circle left of a blue square", "two green triangles", "a yellow star"]
    full = record("full", (1.0, 1.0, 1.0), full_caps, 0.0, task="caption", refs=refs)
    ours = record("mue", (0.9, 0.9, 0.9), ["a red circle left of a blue square", "purple", "A Yellow  star"], 0.4,
                  task="caption", refs=refs)
    assert cal.example_losses("caption", full, ours, "cider").tolist() == [0.0, 1.0, 0.0]
    assert cal.example_losses("caption", full, ours, "differs").tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="different examples"):
        cal.example_losses("caption", full, dict(ours, predictions=ours["predictions"][:2]), "cider")


def test_risk_on_another_split():
    test = [dict(r, split="test") for r in snli_records()]
    assert cal.risk_on(test, "snli_ve", (0.95, 0.95, 0.95)) == pytest.approx(0.01)
    assert cal.risk_on(test, "snli_ve", (1.0, 1.0, 1.0)) == 0.0


def test_cli_on_records_prints_the_choice_and_the_command(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, r in enumerate(snli_records() + [dict(r, split="test") for r in snli_records()]):
        (runs / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "out"
    assert cli.main(["--records", str(runs), "--task", "snli_ve", "--split", "valid", "--test-split", "test",
                     "--epsilon", "0.05", "--delta", "0.1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chosen: 0.95,0.95,0.95" in text
    assert "--img-thres 0.95 --txt-thres 0.95 --dec-thres 0.95" in text
    assert "on test: risk 0.010" in text
    saved = json.loads((out / "calibration_snli_ve.json").read_text())
    assert saved["chosen"] == [0.95, 0.95, 0.95] and saved["test_risk"] == pytest.approx(0.01)


def test_cli_rejects_bad_levels(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--records", str(tmp_path), "--task", "snli_ve", "--epsilon", "1.5"])
    assert "--epsilon and --delta" in capsys.readouterr().err


def test_cli_generates_lazily_with_fairseq_generate(tmp_path, capsys, one_thread):
    """End to end: a 1-update micro checkpoint, the full model and the settings in testing order, each
    generated once; a record exists for the full model and for each tested setting, no other."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    from mue.data.synthetic import generate

    generate(str(tmp_path / "data"), num_train=4, num_valid=6, num_test=3, image_size=32)
    data = str(tmp_path / "data" / "snli_ve")
    small = ["--num-codes", "0", "--num-bins", "0", "--patch-image-size", "32", "--cpu", "--num-workers", "0",
             "--batch-size", "4"]
    argv = [data, "--task", "mue_snli_ve", "--arch", "mue_ofa_micro", *small, "--criterion", "cross_entropy",
            "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--save-dir", str(tmp_path / "ckpt"),
            "--no-epoch-checkpoints", "--no-save-optimizer-state", "--disable-validation", "--seed", "1"]
    train.main(convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv)))
    out = tmp_path / "cal"
    assert cli.main([data, "--task", "mue_snli_ve", "--path", str(tmp_path / "ckpt" / "checkpoint_last.pt"),
                     "--out", str(out), "--grid", "0,0,0", "0.9,0.9,0.9", "--epsilon", "0.5", "--delta", "0.5",
                     "--", *small]) == 0
    saved = json.loads((out / "calibration_snli_ve.json").read_text())
    assert saved["n"] == 18 and saved["split"] == "valid"
    tested = [tuple(t["setting"]) for t in saved["tested"]]
    assert tested[0] == (0.9, 0.9, 0.9) and len(tested) in (1, 2)
    records = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(records) == 1 + len(tested) and any("_full_" in name for name in records)
    assert "use it: fairseq-generate" in capsys.readouterr().out


def test_report_shows_the_calibrated_setting_next_to_the_empirical_pick():
    dev = snli_records()
    test = [dict(r, split="test") for r in snli_records()]
    table = cal.calibration_table(dev, test, "snli_ve", epsilon=0.05, delta=0.1, target=0.99)
    rows = [line for line in table.splitlines() if line.startswith("| Learn-then-Test") or line.startswith("| dev q")]
    assert len(rows) == 2
    assert "| 0.95, 0.95, 0.95 | 0.010 | 0.010 |" in rows[0]
    assert "30.0" in rows[0]  # its test time reduction
