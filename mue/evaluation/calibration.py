"""Thresholds with a guarantee: Learn-then-Test calibration of the three exit thresholds.

The `--target` pick of the report chooses the cheapest setting whose dev quality reaches a share of the
full model's; nothing says it holds on new data. Here, as in CALM (Schuster et al., 2022) with
Learn-then-Test (Angelopoulos et al., 2021), each candidate setting s gets a per-example loss in [0, 1]
on a calibration split: 1 where the early-exit output is not consistent with the full model's. The
null hypothesis "risk(s) = E[loss] > epsilon" is tested with a Hoeffding-Bentkus p-value; the settings
are tested in a fixed order chosen before looking at the data (most conservative first: the sum of the
three thresholds, descending), stopping at the first that fails (fixed-sequence testing). Every setting
that passed then has risk <= epsilon, all at once, with probability >= 1 - delta over the draw of the
calibration split; of those, the cheapest (highest measured expected time reduction) is returned. If the
first setting fails, nothing is certified and the answer is the full model.

Losses (per example, matched by `uniq_id` against the full model's record of the same split):
  * `differs`: the answer (SNLI-VE) or the caption text (captioning) is not the full model's.
  * `cider` (captioning): the caption's CIDEr-D against its references is below `cider_fraction` x the
    full model's caption's (document frequencies from the split's references, words lower-cased and
    split on whitespace).
"""
import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import binom

from mue.exiting.config import NEVER_EXIT

from .cider_d import CiderD
from .records import etr_of, find_baseline, task_records

RISKS = ("differs", "cider")
Setting = Tuple[float, float, float]


# ----------------------------------------------------------------------------------- p-values
def hoeffding_bentkus_pvalue(risk_hat: float, n: int, epsilon: float) -> float:
    """p-value of H0 "risk > epsilon" from the mean `risk_hat` of n losses in [0, 1].

    The smaller of Hoeffding's bound exp(-n h(risk_hat, epsilon)) and Bentkus' e * P(Binomial(n, epsilon)
    <= ceil(n risk_hat)); both are valid, so is their minimum (Bates et al. 2021, RCPS)."""
    if n <= 0:
        raise ValueError("a p-value needs at least one calibration example")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon is a risk level in (0, 1), got {epsilon}")
    if not 0 <= risk_hat <= 1:
        raise ValueError(f"losses must lie in [0, 1]; their mean is {risk_hat}")
    if risk_hat >= epsilon:
        return 1.0
    a, b = risk_hat, epsilon
    kl = (a * math.log(a / b) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - b))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * float(binom.cdf(math.ceil(n * risk_hat - 1e-9), n, epsilon))
    return min(1.0, hoeffding, bentkus)


# ----------------------------------------------------------------------------------- losses
def _by_id(record: dict) -> Dict[str, dict]:
    rows = record.get("predictions")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{record.get('_source', 'a record')}: no per-example 'predictions' to calibrate on "
                         "(written by fairseq-generate --eval-results)")
    return {str(r["uniq_id"]): r for r in rows}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def example_losses(task: str, full: dict, record: dict, risk: str = "differs",
                   cider_fraction: float = 0.9) -> np.ndarray:
    """Per-example 0/1 losses of `record` against the full model's `full` (same split, same examples)."""
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    if risk == "cider" and task != "caption":
        raise ValueError("the cider risk is for captioning; SNLI-VE uses 'differs'")
    ref, got = _by_id(full), _by_id(record)
    if set(ref) != set(got):
        missing = sorted(set(ref) ^ set(got))[:3]
        raise ValueError(f"{record.get('_source', 'record')} and the full model's {full.get('_source', 'record')} "
                         f"cover different examples (e.g. {missing}); calibrate on records of one split")
    ids = sorted(ref)
    key = "prediction" if task == "snli_ve" else "caption"
    if risk == "differs":
        return np.array([float(_normalise(got[i][key]) != _normalise(ref[i][key])) for i in ids])
    refs = [[_normalise(r) for r in ref[i]["refs"]] for i in ids]
    scorer = CiderD()
    full_scores = scorer.batch_scores([_normalise(ref[i][key]) for i in ids], refs)
    scores = scorer.batch_scores([_normalise(got[i][key]) for i in ids], refs)
    return (scores < cider_fraction * full_scores - 1e-12).astype(float)


# ----------------------------------------------------------------------------------- the test
def setting_of(record: dict) -> Setting:
    t = record["thresholds"]
    return (float(t.get("img_thres", NEVER_EXIT)), float(t.get("txt_thres", NEVER_EXIT)),
            float(t.get("dec_thres", NEVER_EXIT)))


def testing_order(settings: Sequence[Setting]) -> List[Setting]:
    """The fixed order of the tests, decided without the data: most conservative (largest threshold sum)
    first; ties by the thresholds themselves, larger first."""
    return sorted(dict.fromkeys(tuple(s) for s in settings), key=lambda s: (sum(s), s), reverse=True)


@dataclasses.dataclass
class Tested:
    setting: Setting
    risk: float
    p_value: float
    passed: bool
    expected_time_reduction: float


@dataclasses.dataclass
class Calibration:
    """The outcome: the chosen setting (the full model when nothing passed) and every test run."""
    task: str
    risk_name: str
    epsilon: float
    delta: float
    n: int
    chosen: Setting
    tested: List[Tested]
    fell_back: bool

    @property
    def chosen_test(self) -> Optional[Tested]:
        return next((t for t in self.tested if t.setting == self.chosen), None)

    def as_record(self) -> dict:
        return {"task": self.task, "risk": self.risk_name, "epsilon": self.epsilon, "delta": self.delta,
                "n": self.n, "chosen": list(self.chosen), "fell_back": self.fell_back,
                "tested": [dataclasses.asdict(t) | {"setting": list(t.setting)} for t in self.tested]}


def fixed_sequence_test(order: Sequence[Setting], losses_of: Callable[[Setting], Tuple[np.ndarray, float]],
                        epsilon: float, delta: float) -> List[Tested]:
    """Test the settings in `order` until one fails. `losses_of(s)` returns (losses, expected time reduction)
    and is called only for the settings tested, so a caller can evaluate them lazily."""
    if not 0 < delta < 1:
        raise ValueError(f"delta is a probability in (0, 1), got {delta}")
    tested = []
    for s in order:
        losses, etr = losses_of(s)
        risk = float(np.mean(losses))
        p = hoeffding_bentkus_pvalue(risk, len(losses), epsilon)
        tested.append(Tested(tuple(s), risk, p, p <= delta, float(etr)))
        if p > delta:
            break
    return tested


def choose(tested: Sequence[Tested]) -> Tuple[Setting, bool]:
    """The cheapest setting that passed; the full model (and True) when none did."""
    passed = [t for t in tested if t.passed]
    if not passed:
        return (NEVER_EXIT,) * 3, True
    best = max(passed, key=lambda t: (t.expected_time_reduction, -sum(t.setting)))
    return best.setting, False


def calibrate_records(records: Sequence[dict], task: str, epsilon: float = 0.05, delta: float = 0.1,
                      risk: str = "differs", cider_fraction: float = 0.9, run: Optional[str] = "mue",
                      baseline_run: str = "full") -> Calibration:
    """Calibrate on the records of one split (the full model's and those of `run`, one per setting)."""
    recs = task_records(records, task)
    full = find_baseline(recs, task, baseline_run)
    candidates = {setting_of(r): r for r in recs if (run is None or r["run"] == run) and r is not full}
    if not candidates:
        raise ValueError(f"no records of run {run!r} for task {task!r} to calibrate")
    n = len(_by_id(full))

    def losses_of(s):
        rec = candidates[s]
        return example_losses(task, full, rec, risk, cider_fraction), etr_of(rec)

    tested = fixed_sequence_test(testing_order(candidates), losses_of, epsilon, delta)
    chosen, fell_back = choose(tested)
    return Calibration(task, risk, epsilon, delta, n, chosen, tested, fell_back)


def risk_on(records: Sequence[dict], task: str, setting: Setting, risk: str = "differs",
            cider_fraction: float = 0.9, run: Optional[str] = "mue", baseline_run: str = "full") -> float:
    """The measured risk of `setting` on another split's records (0 for the full model itself)."""
    recs = task_records(records, task)
    full = find_baseline(recs, task, baseline_run)
    if tuple(setting) == (NEVER_EXIT,) * 3:
        return 0.0
    matches = [r for r in recs if (run is None or r["run"] == run) and setting_of(r) == tuple(setting)]
    if not matches:
        raise ValueError(f"no record of run {run!r} at thresholds {setting} for task {task!r}")
    return float(np.mean(example_losses(task, full, matches[0], risk, cider_fraction)))


# ----------------------------------------------------------------------------------- report
def calibration_table(dev_records: Sequence[dict], test_records: Sequence[dict], task: str,
                      epsilon: float = 0.05, delta: float = 0.1, target: float = 0.99, risk: Optional[str] = None,
                      run: Optional[str] = "mue", baseline_run: str = "full") -> str:
    """Markdown: the setting calibrated on dev (risk <= epsilon w.p. >= 1 - delta) next to the empirical
    `target` pick of the report, each with its dev and test risk, test quality and test cost."""
    from .records import NoSettingMeetsTarget, number, quality_key, quality_of, select_for_target
    from .tables import fmt, markdown, pct

    risk = risk or ("cider" if task == "caption" else "differs")
    key = quality_key(task)
    dev, test = task_records(dev_records, task), task_records(test_records, task)
    test_full = find_baseline(test, task, baseline_run)
    result = calibrate_records(dev, task, epsilon, delta, risk, run=run, baseline_run=baseline_run)
    picks = [(f"Learn-then-Test, epsilon {epsilon:g}, delta {delta:g}"
              + (" (nothing passed: full model)" if result.fell_back else ""), result.chosen)]
    try:
        chosen = select_for_target(dev, test, task, target, run, baseline_run)
        picks.append((f"dev quality >= {100 * target:g} % of full (empirical)", setting_of(chosen["dev_record"])))
    except (NoSettingMeetsTarget, ValueError) as err:
        picks.append((f"dev quality >= {100 * target:g} % of full: {err}".replace("|", "/"), None))
    headers = ["choice", "thresholds (img, txt, dec)", f"dev risk ({risk})", f"test risk ({risk})",
               f"test {key} (% of full)", "test time reduction (%)", "test FLOPs reduction (%)"]
    rows = []
    full = (NEVER_EXIT,) * 3
    for name, setting in picks:
        if setting is None:
            rows.append([name] + ["n/a"] * 6)
            continue
        rec = test_full if setting == full else next(
            (r for r in test if (run is None or r["run"] == run) and setting_of(r) == setting), None)
        dev_risk = risk_on(dev, task, setting, risk, run=run, baseline_run=baseline_run)
        test_risk = risk_on(test, task, setting, risk, run=run, baseline_run=baseline_run) if rec else None
        q = quality_of(rec, key) if rec else None
        q_full = quality_of(test_full, key)
        rows.append([name, ", ".join(f"{x:g}" for x in setting), fmt(dev_risk, "{:.3f}"), fmt(test_risk, "{:.3f}"),
                     "n/a" if q is None else f"{q:.4f} ({pct(q / q_full if q_full else None)})",
                     pct(etr_of(rec)) if rec else "n/a",
                     pct(number(rec, "exit", "flops_reduction", required=False)) if rec else "n/a"])
    note = (f"\n\nLearn-then-Test tested {len(result.tested)} setting(s) on {result.n} dev examples, most "
            f"conservative first, until one failed; the guarantee is that the chosen setting's {risk} risk "
            f"(share of examples {'whose caption CIDEr-D falls below 0.9 x the full model' if risk == 'cider' else 'whose output differs from the full model'}'s) "
            f"is <= {epsilon:g}, with probability >= {1 - delta:g} over the draw of the dev split.")
    return markdown(headers, rows) + note
