"""mue.evaluation.wording_only: the SNLI-VE control that sees only the hypothesis's words."""
import json

import pytest

from mue.data.synthetic import generate
from mue.evaluation.wording_only import (SECTION_TITLE, control_table, difference_interval, fit_and_score,
                                         labelled_hypotheses, section, write_control)


def rows(prefix, texts_labels):
    return [(f"{prefix}{i}", text, label) for i, (text, label) in enumerate(texts_labels)]


def test_words_that_decide_the_label_are_learned():
    train = rows("a", [("the ball is red", "entailment"), ("the ball is made of wood", "neutral"),
                       ("no ball at all", "contradiction")] * 20)
    test = rows("b", [("the cup is red", "entailment"), ("the cup is made of glass", "neutral"),
                      ("no cup at all", "contradiction")])
    result = fit_and_score(train, test)
    assert result["accuracy"] == 1.0 and result["n_test"] == 3 and result["n_train"] == 60
    assert [p["prediction"] for p in result["predictions"]] == ["entailment", "neutral", "contradiction"]


def test_words_that_do_not_decide_leave_it_at_chance():
    train = rows("a", [("there is a red circle", "entailment"), ("there is a red circle", "contradiction")] * 30)
    test = rows("b", [("there is a red circle", "entailment"), ("there is a red circle", "contradiction")] * 10)
    assert fit_and_score(train, test)["accuracy"] == 0.5
    with pytest.raises(ValueError, match="at least two labels"):
        fit_and_score(train[:1], test)


def test_difference_interval_is_paired():
    model = {f"t{i}": 1.0 for i in range(100)}
    control = {f"t{i}": float(i < 60) for i in range(100)}
    low, high = difference_interval(model, control)
    assert 0.3 < low < 0.4 < high < 0.5
    assert difference_interval(model, {"other": 1.0}) is None
    same = difference_interval(model, model)
    assert same == (0.0, 0.0)


def full_record(right):
    preds = [{"uniq_id": f"t{i}", "prediction": "yes" if ok else "no", "answer": "yes"} for i, ok in enumerate(right)]
    return {"task": "snli_ve", "run": "full", "split": "test", "predictions": preds,
            "metrics": {"accuracy": sum(right) / len(right)},
            "thresholds": {"img_thres": 1.0, "txt_thres": 1.0, "dec_thres": 1.0},
            "exit": {"n_dec_layers": 3, "n_enc_layers": 3, "expected_time_reduction": 0.0, "wall_clock_s": 1.0}}


def test_table_and_section(tmp_path):
    control = {"accuracy": 0.6, "n_test": 10, "n_train": 30, "predictions": [
        {"uniq_id": f"t{i}", "prediction": "entailment" if i < 6 else "neutral", "answer": "entailment"}
        for i in range(10)]}
    full = full_record([True] * 9 + [False])
    table = control_table(control, full)
    assert "| 60.0 | 10 |" in table and "| 90.0 | 10 |" in table and "Full model minus control: 30.0 points" in table
    path = tmp_path / "control.json"
    assert section(str(path), [full]) == {}  # no control result yet
    path.write_text(json.dumps(control))
    assert section(str(path), [full]) == {SECTION_TITLE: table}
    assert section(str(path), []) == {}  # no SNLI-VE records


def test_on_the_synthetic_scenes_the_words_give_away_only_the_neutral_statements(tmp_path):
    """The scenes' hypotheses: neutral ones have their own templates, true and false ones share theirs, so
    the control reaches about 1/3 + 2/3 x 1/2 and no more: the rest must come from the image."""
    paths = generate(str(tmp_path), seed=3, num_train=300, num_valid=200, num_test=1, image_size=16,
                     hypotheses_per_image=6)
    result = write_control(paths["train"]["snli_ve"], paths["valid"]["snli_ve"], str(tmp_path / "c.json"))
    assert result["n_train"] == 1800 and result["n_test"] == 1200
    assert 0.6 < result["accuracy"] < 0.72
    by_label = {}
    for p in result["predictions"]:
        by_label.setdefault(p["answer"], []).append(p["prediction"] == p["answer"])
    assert sum(by_label["neutral"]) / len(by_label["neutral"]) > 0.95
    assert json.load(open(tmp_path / "c.json"))["accuracy"] == result["accuracy"]
    assert labelled_hypotheses(paths["valid"]["snli_ve"])[0][0] == "valid_000000_0"
