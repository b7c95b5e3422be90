"""CIDEr-D (Vedantam et al. 2015) with document frequencies fixed from a reference corpus.

The definition is the one of the `CiderD` scorer used for self-critical training (OFA, ruotianluo's
cider) and of pycocoevalcap's `cider_scorer` (which, despite the name `Cider`, already clips and
length-penalises): 1..4-gram tf-idf vectors with idf = log(num_docs) - log(max(1, df)); per n the
clipped cosine sum(min(c, r) * r) / (|c| |r|) times a Gaussian length penalty exp(-d^2 / (2 sigma^2)),
sigma 6; mean over n, mean over references, times 10. (Both reference implementations count lengths
in bigrams, words - 1; the length difference is then the same as in words except against an empty
sentence, whose vector is zero and scores 0 anyway, so words are used here.)

The difference from pycocoevalcap's `Cider` is only where the document frequencies come from:
`Cider` takes them from the references of the captions being scored, `CiderD` from a fixed corpus
(the training references for SCST rewards), cached in a file so it is computed once.
Sentences are split on whitespace: tokenise and lower-case them before scoring.
"""
import json
import math
import pickle
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

Ngram = Tuple[str, ...]
DF_FILE_FORMAT = "mue-cider-d-df"


def ngram_counts(sentence: str, n: int = 4) -> Counter:
    """Counts of the 1..n-grams (tuples of words) of a whitespace-tokenised sentence."""
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D scorer.

    df: n-gram -> number of documents (images) whose references contain it; num_docs: the number of
    documents of that corpus. With both None, `batch_scores` takes them from the references it is
    given (pycocoevalcap's `Cider` behaviour).
    """

    def __init__(self, df: Optional[Dict[Ngram, float]] = None, num_docs: Optional[int] = None,
                 n: int = 4, sigma: float = 6.0):
        if (df is None) != (num_docs is None):
            raise ValueError("CiderD: give both df and num_docs, or neither")
        if num_docs is not None and num_docs < 1:
            raise ValueError(f"CiderD: num_docs must be >= 1, got {num_docs}")
        self.df, self.num_docs, self.n, self.sigma = df, num_docs, n, sigma

    @staticmethod
    def document_frequencies(refs_corpus: Iterable[Sequence[str]], n: int = 4) -> Tuple[Dict[Ngram, int], int]:
        """(df, num_docs) of a corpus given as one list of reference sentences per image."""
        df: Counter = Counter()
        num_docs = 0
        for index, refs in enumerate(refs_corpus):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"reference corpus item {index}: expected a non-empty list of sentences, "
                                 f"got {refs!r}")
            num_docs += 1
            df.update({gram for ref in refs for gram in ngram_counts(ref, n)})
        if num_docs == 0:
            raise ValueError("reference corpus is empty")
        return dict(df), num_docs

    @classmethod
    def from_corpus(cls, refs_corpus: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0) -> "CiderD":
        df, num_docs = cls.document_frequencies(refs_corpus, n)
        return cls(df, num_docs, n, sigma)

    def save_df(self, path: str) -> None:
        """Write the document frequencies as JSON (n-grams joined by single spaces)."""
        if self.df is None:
            raise ValueError("CiderD.save_df: this scorer has no fixed document frequencies")
        payload = {"format": DF_FILE_FORMAT, "n": self.n, "num_docs": self.num_docs,
                   "df": {" ".join(gram): count for gram, count in self.df.items()}}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f)

    @classmethod
    def load_df(cls, path: str, sigma: float = 6.0) -> "CiderD":
        """Read a file written by `save_df`, or a `.p`/`.pkl` pickle in the format of OFA's
        `coco-train-words.p` ({'document_frequency': {ngram tuple: count}, 'ref_len': num_docs}).
        Pickles can run code when loaded: load only files you trust."""
        if path.endswith((".p", ".pkl", ".pickle")):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            missing = {"document_frequency", "ref_len"} - set(data)
            if missing:
                raise ValueError(f"{path}: CIDEr-D pickle lacks keys {sorted(missing)}")
            df = {tuple(gram): float(c) for gram, c in data["document_frequency"].items()}
            n = max((len(gram) for gram in df), default=4)
            return cls(df, int(data["ref_len"]), n, sigma)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != DF_FILE_FORMAT:
            raise ValueError(f"{path}: not a CIDEr-D document-frequency file (format "
                             f"{data.get('format')!r}, expected {DF_FILE_FORMAT!r})")
        df = {tuple(gram.split(" ")): count for gram, count in data["df"].items()}
        return cls(df, int(data["num_docs"]), int(data["n"]), sigma)

    def score(self, candidate: str, refs: Sequence[str]) -> float:
        """CIDEr-D of one candidate against its references, with the fixed document frequencies."""
        if self.df is None:
            raise ValueError("CiderD.score needs fixed document frequencies (CiderD.from_corpus or "
                             "load_df); batch_scores can take them from its own references")
        return float(self.batch_scores([candidate], [refs])[0])

    def batch_scores(self, cands: Sequence[str], refs_list: Sequence[Sequence[str]]) -> np.ndarray:
        """Scores of each candidate against its own references, as a float64 array."""
        if len(cands) != len(refs_list):
            raise ValueError(f"{len(cands)} candidates but {len(refs_list)} reference lists")
        for index, refs in enumerate(refs_list):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"references of candidate {index}: expected a non-empty list of "
                                 f"sentences, got {refs!r}")
        if self.df is None:
            df, num_docs = self.document_frequencies(refs_list, self.n)
        else:
            df, num_docs = self.df, self.num_docs
        log_docs = math.log(float(num_docs))
        cache: Dict[str, tuple] = {}

        def vector(sentence: str):
            if sentence not in cache:
                cache[sentence] = self._vector(ngram_counts(sentence, self.n), df, log_docs)
            return cache[sentence]

        scores = np.zeros(len(cands), dtype=np.float64)
        for index, (cand, refs) in enumerate(zip(cands, refs_list)):
            hyp = vector(cand)
            per_n = np.zeros(self.n)
            for ref in refs:
                per_n += self._similarity(hyp, vector(ref))
            scores[index] = 10.0 * per_n.mean() / len(refs)
        return scores

    def _vector(self, counts: Counter, df: Dict[Ngram, float], log_docs: float):
        """tf-idf weights per n-gram order, their norms, and the length in words."""
        weights: List[Dict[Ngram, float]] = [{} for _ in range(self.n)]
        for gram, tf in counts.items():
            weights[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, df.get(gram, 0.0))))
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return weights, norms, length

    def _similarity(self, hyp, ref) -> np.ndarray:
        """Per n: clipped cosine of candidate and reference vectors times the length penalty."""
        (hw, hn, hl), (rw, rn, rl) = hyp, ref
        penalty = math.exp(-((hl - rl) ** 2) / (2 * self.sigma ** 2))
        out = np.zeros(self.n)
        for k in range(self.n):
            dot = sum(min(w, rw[k].get(g, 0.0)) * rw[k].get(g, 0.0) for g, w in hw[k].items())
            if hn[k] != 0 and rn[k] != 0:
                dot /= hn[k] * rn[k]
            out[k] = dot * penalty
        return out
