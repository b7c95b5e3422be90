"""Caption metrics.

Two uses, two tools:
  * final evaluation (``fairseq-generate``, scripts): the COCO metric set from pycocoevalcap -- BLEU-1..4,
    METEOR, ROUGE-L, CIDEr after the PTB tokenizer, and SPICE when its Stanford CoreNLP jars are installed
    (``compute_caption_metrics``; ``CaptionResults`` gathers one split's captions batch by batch);
  * validation inside ``fairseq-train``: statistics that add up over batches, so fairseq's metrics can sum
    them across batches and workers -- BLEU n-gram counts (``bleu_stats`` / ``corpus_bleu``, the same
    closest-reference corpus BLEU as pycocoevalcap); per-image CIDEr against a document-frequency table
    fixed once from the whole split's references is ``mue.evaluation.cider_d.CiderD.from_corpus`` (CIDEr
    computed per batch would use a different table in every batch).

Command line (score a record written by ``fairseq-generate --eval-results``, or hypotheses and references):
    python -m mue.evaluation.caption_metrics --results caption_test.json [--out scores.json]
    python -m mue.evaluation.caption_metrics --hyps hyps.json --refs refs.json
``hyps.json``: {id: caption} or a COCO results list [{"image_id", "caption"}] (what ``--coco-results``
writes); ``refs.json``: {id: [captions]} or a COCO caption annotation file ({"images", "annotations"}, e.g.
the synthetic data's ``caption/{split}_refs.json``).

Note: pycocoevalcap's PTB tokenizer and SPICE write temporary files inside the pycocoevalcap package
folder, which must therefore be writable.
"""
import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

from .result_files import is_coco_annotations, load_coco_references

logger = logging.getLogger(__name__)

BLEU_ORDER = 4
ALL_METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
_SPICE_WARNED = False


# --------------------------------------------------------------------------------------------
# full COCO metric set
# --------------------------------------------------------------------------------------------


def spice_jars() -> List[str]:
    """The Stanford CoreNLP 3.6.0 jars pycocoevalcap's SPICE needs (it downloads them when missing)."""
    from pycocoevalcap.spice import get_stanford_models as gsm

    lib = os.path.join(os.path.dirname(os.path.abspath(gsm.__file__)), gsm.SPICELIB)
    return [os.path.join(lib, f"{gsm.JAR}.jar"), os.path.join(lib, f"{gsm.JAR}-models.jar")]


def spice_available() -> bool:
    """True when SPICE can run offline (its CoreNLP jars are in place)."""
    return all(os.path.isfile(p) for p in spice_jars())


def _warn_spice_once():
    global _SPICE_WARNED
    if not _SPICE_WARNED:
        _SPICE_WARNED = True
        logger.warning(
            "SPICE skipped: Stanford CoreNLP jars not found (%s); pycocoevalcap would download them. "
            "Put stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar there to get SPICE.",
            " and ".join(spice_jars()))


def check_hyps_refs(hyps: Dict[Hashable, str], refs: Dict[Hashable, Sequence[str]]) -> None:
    """Raise ValueError unless hyps and refs cover the same ids, hyps are strings and refs non-empty."""
    missing_h = [k for k in refs if k not in hyps]
    missing_r = [k for k in hyps if k not in refs]
    if missing_h or missing_r:
        raise ValueError(
            f"caption metrics: hypotheses and references must cover the same ids; "
            f"{len(missing_h)} ids have no hypothesis (e.g. {missing_h[:5]}), "
            f"{len(missing_r)} have no references (e.g. {missing_r[:5]})")
    if not hyps:
        raise ValueError("caption metrics: no captions to score")
    for k, h in hyps.items():
        if not isinstance(h, str):
            raise ValueError(f"caption metrics: hypothesis of id {k!r} is not a string: {h!r}")
        r = refs[k]
        if isinstance(r, str) or not r or not all(isinstance(x, str) for x in r):
            raise ValueError(f"caption metrics: references of id {k!r} must be a non-empty list of strings")


def compute_caption_metrics(
    hyps: Dict[Hashable, str],
    refs: Dict[Hashable, Sequence[str]],
    metrics: Iterable[str] = ALL_METRICS,
    ptb_tokenize: bool = True,
) -> Dict[str, float]:
    """COCO caption metrics of ``hyps[id]`` against ``refs[id]`` over all ids.

    Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "num_images"} (those asked for in
    ``metrics``, a subset of ``ALL_METRICS``; SPICE only when ``spice_available()``, else skipped with
    one warning per process). Scores are pycocoevalcap's, in [0, 1] (CIDEr in [0, 10]), not x100.
    ``ptb_tokenize=False`` splits on whitespace instead of running the Java PTB tokenizer.
    """
    metrics = set(metrics)
    unknown = metrics - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"caption metrics: unknown metric(s) {sorted(unknown)}; choose from {ALL_METRICS}")
    check_hyps_refs(hyps, refs)
    ids = list(refs)
    gts, res = tokenized(hyps, refs, ptb_tokenize)

    scorers = []
    if "bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        scorers.append((Bleu(BLEU_ORDER), [f"Bleu_{n}" for n in range(1, BLEU_ORDER + 1)]))
    if "meteor" in metrics:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), ["METEOR"]))
    if "rouge" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        scorers.append((Rouge(), ["ROUGE_L"]))
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        scorers.append((Cider(), ["CIDEr"]))
    if "spice" in metrics:
        if spice_available():
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), ["SPICE"]))
        else:
            _warn_spice_once()

    out: Dict[str, float] = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's BLEU prints its counts
            score, _ = scorer.compute_score(gts, res)
        scores = score if isinstance(score, (list, tuple)) else [score]
        out.update({name: float(s) for name, s in zip(names, scores)})
    out["num_images"] = len(ids)
    return out


def tokenized(hyps: Dict[Hashable, str], refs: Dict[Hashable, Sequence[str]],
              ptb_tokenize: bool = True) -> Tuple[Dict[str, List[str]], Dict[str, List[str]]]:
    """(gts, res) as pycocoevalcap's scorers take them, keyed "0", "1", ... in the order of ``refs``:
    PTB-tokenized, or lower-cased and split on whitespace with ``ptb_tokenize=False``."""
    ids = list(refs)
    key = {k: str(i) for i, k in enumerate(ids)}  # PTB tokenizer and SPICE want plain, unique keys
    gts = {key[k]: [{"caption": r} for r in refs[k]] for k in ids}
    res = {key[k]: [{"caption": hyps[k]}] for k in ids}
    if ptb_tokenize:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        return tok.tokenize(gts), tok.tokenize(res)
    gts = {k: [" ".join(c["caption"].lower().split()) for c in v] for k, v in gts.items()}
    res = {k: [" ".join(c["caption"].lower().split()) for c in v] for k, v in res.items()}
    return gts, res


class CaptionResults:
    """The generated captions of one evaluation split, gathered batch by batch, then scored.

    ``expected``: the split size; ``compute()`` refuses to score an incomplete split, so a dropped batch
    cannot go unnoticed.
    """

    def __init__(self, split: str, expected: int):
        self.split = split
        self.expected = int(expected)
        self.rows: Dict[str, dict] = {}

    def add(self, uniq_id: str, hyp: str, refs: Sequence[str], image_id: Optional[str] = None) -> None:
        if uniq_id in self.rows:
            raise ValueError(f"{self.split}: caption for id {uniq_id!r} generated twice")
        self.rows[uniq_id] = {"uniq_id": uniq_id, "image_id": image_id if image_id is not None else uniq_id,
                              "caption": hyp, "refs": list(refs)}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.expected

    def compute(self, **kwargs) -> Dict[str, float]:
        if not self.complete:
            raise ValueError(f"{self.split}: {len(self.rows)} of {self.expected} captions generated; "
                             "scores over a partial split are not reported")
        hyps = {k: r["caption"] for k, r in self.rows.items()}
        refs = {k: r["refs"] for k, r in self.rows.items()}
        return compute_caption_metrics(hyps, refs, **kwargs)

    def predictions(self) -> list:
        """[{"uniq_id", "image_id", "caption", "refs"}], as stored in an --eval-results record."""
        return list(self.rows.values())


# --------------------------------------------------------------------------------------------
# decomposable statistics for validation
# --------------------------------------------------------------------------------------------


def bleu_stats(hyp: str, refs: Sequence[str], n: int = BLEU_ORDER) -> dict:
    """One sentence's BLEU statistics (whitespace tokens, closest reference length, as pycocoevalcap):
    {"testlen", "reflen", "guess": [n], "correct": [n]}; sum them over a corpus and call ``corpus_bleu``."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    return cook_test(hyp, cook_refs(list(refs), n=n), eff="closest", n=n)


def corpus_bleu(correct: Sequence[float], guess: Sequence[float], testlen: float, reflen: float) -> List[float]:
    """Corpus BLEU-1..n from summed statistics, with pycocoevalcap's smoothing constants and brevity
    penalty; returns [BLEU-1, ..., BLEU-n] in [0, 1]."""
    tiny, small = 1e-15, 1e-9
    bleus, prod = [], 1.0
    for k in range(len(correct)):
        prod *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        bleus.append(prod ** (1.0 / (k + 1)))
    ratio = (float(testlen) + tiny) / (float(reflen) + small)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read json: {e}")


def load_hyps_refs(results: Optional[str] = None, hyps: Optional[str] = None, refs: Optional[str] = None):
    """(hyps, refs) dicts from a results file of the caption task, or from separate hyps/refs files."""
    if results:
        data = _load_json(results)
        rows = data.get("predictions") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise SystemExit(f"{results}: expected an --eval-results record (a json object with a 'predictions' list)")
        return ({r["uniq_id"]: r["caption"] for r in rows}, {r["uniq_id"]: r["refs"] for r in rows})
    h, r = _load_json(hyps), _load_json(refs)
    if isinstance(h, list):  # COCO results format
        if not all(isinstance(x, dict) and "image_id" in x and "caption" in x for x in h):
            raise SystemExit(f"{hyps}: a COCO results list needs 'image_id' and 'caption' in every entry")
        h = {str(x["image_id"]): x["caption"] for x in h}
    if not isinstance(h, dict):
        raise SystemExit(f"{hyps}: expected {{id: caption}} or a COCO results list [{{image_id, caption}}]")
    if is_coco_annotations(r):
        try:
            r = load_coco_references(r, refs)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    elif not isinstance(r, dict):
        raise SystemExit(f"{refs}: expected {{id: [captions]}} or a COCO annotation file {{images, annotations}}")
    return {str(k): v for k, v in h.items()}, {str(k): v for k, v in r.items()}


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (see the module doc)."""
    p = argparse.ArgumentParser(description="COCO caption metrics (pycocoevalcap) of generated captions")
    p.add_argument("--results", help="record written by fairseq-generate --task mue_caption --eval-results FILE")
    p.add_argument("--hyps", help="json {id: caption} or COCO results list [{image_id, caption}] "
                                  "(fairseq-generate --coco-results FILE)")
    p.add_argument("--refs", help="json {id: [reference captions]} or a COCO caption annotation file "
                                  "{images, annotations} (e.g. the synthetic data's caption/test_refs.json)")
    p.add_argument("--metrics", default=",".join(ALL_METRICS), help=f"comma list of {ALL_METRICS}")
    p.add_argument("--out", help="write the scores as json here")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    one_record = bool(args.results) and not (args.hyps or args.refs)
    two_files = not args.results and bool(args.hyps and args.refs)
    if not (one_record or two_files):
        p.error("give --results, or both --hyps and --refs")
    hyps, refs = load_hyps_refs(args.results, args.hyps, args.refs)
    scores = compute_caption_metrics(hyps, refs, metrics=[m for m in args.metrics.split(",") if m])
    text = json.dumps(scores, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return scores


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
