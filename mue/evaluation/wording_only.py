"""The wording-only control of SNLI-VE: how many labels the hypotheses' words give away without the image.

A multinomial logistic regression (scikit-learn) over each hypothesis's word 1- to 3-grams, fitted on the
training rows and scored on the test rows. SNLI-VE accuracy means little until it is set beside this: on the
synthetic scenes, neutral statements have templates of their own while true and false statements share
theirs, so the words alone reach about 67 %; a model that answers from the image must beat that.
The report prints the control beside the full model, with the paired bootstrap interval of the difference
over the test pairs.

Command line:
    python -m mue.evaluation.wording_only TRAIN.tsv TEST.tsv [--out control.json]
(OFA SNLI-VE TSV files; images are not decoded.)
"""
import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mue.data.readers import OfaSnliVeTsv

from .intervals import per_example_quality
from .paired_bootstrap import bootstrap_counts
from .records import find_baseline, quality_of
from .tables import pct

SECTION_TITLE = "SNLI-VE against the wording-only control (test)"
ROUNDS = 1000


def labelled_hypotheses(tsv_path: str) -> List[Tuple[str, str, str]]:
    """(uniq_id, hypothesis, label) of every row of an OFA SNLI-VE TSV, without decoding its images."""
    reader = OfaSnliVeTsv(tsv_path)
    return [reader.text_fields(i) for i in range(len(reader))]


def fit_and_score(train: Sequence[Tuple[str, str, str]], test: Sequence[Tuple[str, str, str]]) -> dict:
    """Fit the control on ``train`` rows, predict ``test``; {"accuracy", "n_train", "n_test", "predictions":
    [{"uniq_id", "prediction", "answer"}]} (predictions in the sweep records' format, labels as answers)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    if len({label for _, _, label in train}) < 2:
        raise ValueError("the wording-only control needs training rows of at least two labels")
    vectorizer = CountVectorizer(ngram_range=(1, 3), token_pattern=r"[a-z0-9']+", lowercase=True)
    features = vectorizer.fit_transform([hyp for _, hyp, _ in train])
    model = LogisticRegression(max_iter=2000).fit(features, [label for _, _, label in train])
    predicted = model.predict(vectorizer.transform([hyp for _, hyp, _ in test]))
    predictions = [{"uniq_id": uid, "prediction": str(p), "answer": label}
                   for (uid, _, label), p in zip(test, predicted)]
    accuracy = float(np.mean([p["prediction"] == p["answer"] for p in predictions])) if predictions else 0.0
    return {"accuracy": accuracy, "n_train": len(train), "n_test": len(test), "predictions": predictions}


def write_control(train_tsv: str, test_tsv: str, path: str) -> dict:
    """Fit and score the control on two TSV files; write the result (JSON) to ``path`` and return it."""
    result = fit_and_score(labelled_hypotheses(train_tsv), labelled_hypotheses(test_tsv))
    result.update(train=os.path.abspath(train_tsv), test=os.path.abspath(test_tsv))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def difference_interval(model: Dict[str, float], control: Dict[str, float], rounds: int = ROUNDS,
                        seed: int = 1) -> Optional[Tuple[float, float]]:
    """The 95 % percentile interval of accuracy(model) - accuracy(control) over paired resamples of the
    test pairs; None when the two did not answer the same pairs."""
    if not model or set(model) != set(control):
        return None
    ids = sorted(model)
    counts = bootstrap_counts(len(ids), rounds, seed)
    diff = counts @ (np.array([model[i] for i in ids]) - np.array([control[i] for i in ids])) / len(ids)
    low, high = np.percentile(diff, [2.5, 97.5])
    return float(low), float(high)


def control_table(control: dict, full: dict) -> str:
    """Markdown: the control's and the full model's test accuracy and their difference with its interval."""
    mine = {p["uniq_id"]: float(p["prediction"] == p["answer"]) for p in control["predictions"]}
    theirs = per_example_quality(full, "accuracy") or {}
    acc_full = quality_of(full, "accuracy")
    interval = difference_interval(theirs, mine)
    cell = "n/a (the two did not answer the same pairs)" if interval is None else \
        f"[{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"
    lines = ["| | accuracy | pairs |", "|---|---|---|",
             f"| wording-only control (logistic regression on the hypothesis's 1-3-grams) | "
             f"{100 * control['accuracy']:.1f} | {control['n_test']} |",
             f"| full model (all layers, image and hypothesis) | {pct(acc_full)} | {len(theirs) or 'n/a'} |",
             "", f"Full model minus control: {pct(None if acc_full is None else acc_full - control['accuracy'])}"
             f" points, 95 % interval {cell} (paired bootstrap over the test pairs, {ROUNDS} rounds). "
             "The model reads the image where it beats the control by more than the interval's width."]
    return "\n".join(lines)


def section(control_path: str, test_records: Sequence[dict]) -> Dict[str, str]:
    """{title: markdown} for the report, or {} when there is no control result or no full SNLI-VE record."""
    if not os.path.isfile(control_path):
        return {}
    try:
        full = find_baseline(test_records, "snli_ve")
    except ValueError:  # no SNLI-VE records, or no full model among them
        return {}
    with open(control_path, encoding="utf-8") as f:
        control = json.load(f)
    return {SECTION_TITLE: control_table(control, full)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mue.evaluation.wording_only", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", help="OFA SNLI-VE TSV the control is fitted on")
    parser.add_argument("test", help="OFA SNLI-VE TSV it is scored on")
    parser.add_argument("--out", help="write the result (with per-pair predictions) here as JSON")
    args = parser.parse_args(argv)
    if args.out:
        result = write_control(args.train, args.test, args.out)
    else:
        result = fit_and_score(labelled_hypotheses(args.train), labelled_hypotheses(args.test))
    print(f"wording-only accuracy {100 * result['accuracy']:.1f} % on {result['n_test']} test pairs "
          f"(fitted on {result['n_train']})")


if __name__ == "__main__":
    main()
