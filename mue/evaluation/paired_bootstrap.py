"""Is caption model B better than A on the same images? A paired bootstrap over images.

Both result records (``fairseq-generate --eval-results``, or the sweep's records) must caption the same
images against the same references. Each bootstrap round draws the test images with replacement and
recomputes, on that draw, both systems' scores and their difference:
  * CIDEr: the mean of per-image CIDEr scores (pycocoevalcap's ``Cider``), with document frequencies fixed
    from the whole test set's references, as the reported corpus figure uses them (CIDEr of a resample
    with its own frequencies would count a repeated image as several documents);
  * BLEU-4: corpus BLEU (closest reference length, pycocoevalcap's smoothing) from the drawn images'
    summed n-gram statistics, so each round is the corpus BLEU of that draw.
The interval is the 2.5 and 97.5 percentiles of the differences (percentile bootstrap); B's gain is above
noise when the lower end is above 0. Scores are reported x100, as in papers.

Command line:
    python -m mue.evaluation.paired_bootstrap STAGE1.json STAGE2.json [--rounds 2000] [--seed 1]
"""
import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from .caption_metrics import bleu_stats, corpus_bleu, tokenized

def paired_inputs(a: dict, b: dict) -> tuple:
    """(hyps_a, hyps_b, refs) keyed by uniq_id from two records with per-image ``predictions``; refuses
    records that do not cover the same images with the same references."""
    rows = []
    for name, record in (("first", a), ("second", b)):
        preds = record.get("predictions")
        if not isinstance(preds, list) or not preds:
            raise ValueError(f"the {name} record ({record.get('_source', 'no file name')}) has no per-image "
                             "'predictions' (write it with fairseq-generate --eval-results)")
        rows.append({str(p["uniq_id"]): p for p in preds})
    ra, rb = rows
    if set(ra) != set(rb):
        only = sorted(set(ra) ^ set(rb))
        raise ValueError(f"the two records caption different images ({len(only)} ids in one only, e.g. {only[:3]})")
    differ = [k for k in ra if list(ra[k]["refs"]) != list(rb[k]["refs"])]
    if differ:
        raise ValueError(f"the two records have different references for {len(differ)} images, e.g. {differ[:3]}")
    ids = sorted(ra)
    return ({k: ra[k]["caption"] for k in ids}, {k: rb[k]["caption"] for k in ids}, {k: ra[k]["refs"] for k in ids})


def per_image_scores(hyps: Dict[str, str], refs: Dict[str, Sequence[str]], ptb_tokenize: bool = False) -> dict:
    """{"cider": [n] per-image CIDEr, "bleu": [n, 2 + 2 * 4] BLEU statistics (testlen, reflen, guess, correct)}
    in the order of ``refs``."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = tokenized(hyps, refs, ptb_tokenize)
    _, cider = Cider().compute_score(gts, res)
    keys = [str(i) for i in range(len(refs))]
    bleu = []
    for k in keys:
        st = bleu_stats(res[k][0], gts[k])
        bleu.append([st["testlen"], st["reflen"], *st["guess"], *st["correct"]])
    return {"cider": np.asarray(cider, dtype=np.float64), "bleu": np.asarray(bleu, dtype=np.float64)}


def _bleu4(stats: np.ndarray) -> float:
    """Corpus BLEU-4 from summed rows of ``per_image_scores``' BLEU statistics."""
    n = (stats.size - 2) // 2
    return corpus_bleu(stats[2 + n:], stats[2:2 + n], stats[0], stats[1])[-1]


def bootstrap_counts(n: int, rounds: int, seed: int) -> np.ndarray:
    """[rounds, n]: how often each of ``n`` examples is drawn in each resample (with replacement), so a
    round's sum of per-example values is ``counts @ values``."""
    draws = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    return np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)


def paired_bootstrap(hyps_a: Dict[str, str], hyps_b: Dict[str, str], refs: Dict[str, Sequence[str]],
                     rounds: int = 2000, seed: int = 1, ptb_tokenize: bool = False) -> Dict[str, dict]:
    """{metric: {"a", "b", "diff", "low", "high", "p_not_better"}} x100 for CIDEr and BLEU-4: B minus A on
    all images, and the 95 % percentile interval of that difference over ``rounds`` paired resamples.
    ``p_not_better``: the share of rounds where B did not beat A."""
    if rounds < 100:
        raise ValueError(f"a 95 % interval needs at least 100 bootstrap rounds, got {rounds}")
    sa = per_image_scores(hyps_a, refs, ptb_tokenize)
    sb = per_image_scores(hyps_b, refs, ptb_tokenize)
    n = len(refs)
    counts = bootstrap_counts(n, rounds, seed)
    out = {}
    diff_cider = counts @ (sb["cider"] - sa["cider"]) / n
    bleu_a = counts @ sa["bleu"]
    bleu_b = counts @ sb["bleu"]
    diff_bleu = np.array([_bleu4(bb) - _bleu4(ba) for ba, bb in zip(bleu_a, bleu_b)])
    full = {"CIDEr": (sa["cider"].mean(), sb["cider"].mean()),
            "Bleu_4": (_bleu4(sa["bleu"].sum(0)), _bleu4(sb["bleu"].sum(0)))}
    for metric, diffs in (("CIDEr", diff_cider), ("Bleu_4", diff_bleu)):
        a, b = full[metric]
        low, high = np.percentile(diffs, [2.5, 97.5])
        out[metric] = {"a": 100 * a, "b": 100 * b, "diff": 100 * (b - a), "low": 100 * low, "high": 100 * high,
                       "p_not_better": float((diffs <= 0).mean()), "images": n, "rounds": rounds}
    return out


def compare_records(a: dict, b: dict, **kwargs) -> Dict[str, dict]:
    """``paired_bootstrap`` of two result records (see ``paired_inputs``)."""
    return paired_bootstrap(*paired_inputs(a, b), **kwargs)


def metric_cells(metric: str, r: dict) -> str:
    """Markdown cells "metric | A | B | difference | [low, high]" of one ``paired_bootstrap`` entry."""
    label = "BLEU-4" if metric == "Bleu_4" else metric
    return f"{label} | {r['a']:.1f} | {r['b']:.1f} | {r['diff']:+.1f} | [{r['low']:+.1f}, {r['high']:+.1f}]"


def difference_table(result: Dict[str, dict], name_a: str, name_b: str) -> List[str]:
    """Markdown lines: one row per metric, B minus A with its interval."""
    lines = [f"| metric | {name_a} | {name_b} | difference | 95 % interval |", "|---|---|---|---|---|"]
    lines += [f"| {metric_cells(metric, r)} |" for metric, r in result.items()]
    n = next(iter(result.values()))
    lines.append(f"\nPaired bootstrap over {n['images']} images, {n['rounds']} rounds; the gain is above noise "
                 "when the interval's lower end is above 0.")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="result record of the baseline (A), e.g. stage 1")
    parser.add_argument("second", help="result record compared with it (B), e.g. stage 2")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ptb-tokenize", action="store_true", help="PTB tokenizer (Java) instead of whitespace")
    args = parser.parse_args(argv)
    records = []
    for path in (args.first, args.second):
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, ValueError) as err:
            sys.exit(f"error: {path}: {err}")
    try:
        result = compare_records(*records, rounds=args.rounds, seed=args.seed, ptb_tokenize=args.ptb_tokenize)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print("\n".join(difference_table(result, "A: " + args.first, "B: " + args.second)))


if __name__ == "__main__":
    main()
