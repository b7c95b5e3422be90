"""fairseq datasets turning reader records (mue.data.readers) into examples for the collater.

``SnliVeDataset``: source ``' does the image describe " HYP "?'`` (or the premise prompt), target the answer
word (" yes" / " no" / " maybe") + eos, a constraint mask restricting every target position to the tokens
that continue one of the three answers (OFA's constraint trie), the label (0 no, 1 yes, 2 maybe).
``CaptionDataset``: source ``' what does the image describe?'``, target the normalised caption (max
``max_tgt_length`` words) + eos; evaluation examples also carry every normalised reference.

Text follows OFA (docs/OFA.md, "Text normalisation"): lower-cased, punctuation removed, truncated to ``max_src_length`` words
(hypothesis, premise) or ``max_tgt_length`` words (training captions; the first reference at evaluation).
Text that BPE-encodes to ids missing from the dictionary is an error (a wrong dict.txt), never <unk>.

Sizes are fixed upper bounds, so batching never decodes an image; every example is kept (nothing is
filtered by size). Training order is a fresh permutation per epoch, evaluation order is the file order.
"""
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from fairseq.data import Dictionary, FairseqDataset

from mue.data.collater import collate
from mue.data.readers import DataError
from mue.data.tokenizer import (CAPTION_PROMPT, SNLI_VE_ANSWERS, SNLI_VE_PREMISE_PROMPT, SNLI_VE_PROMPT,
                                Tokenizer, normalize_text)
from mue.data.transforms import image_transform

#: SNLI-VE label -> (class index, answer text); class index = position in SNLI_VE_ANSWERS
SNLI_VE_LABEL_TO_CLASS = {"contradiction": 0, "entailment": 1, "neutral": 2}


def encode_answer_candidates(tokenizer: Tokenizer, dictionary: Dictionary,
                             answers: Sequence[str] = SNLI_VE_ANSWERS) -> List[torch.Tensor]:
    """Each answer's target tokens (BPE tokens + eos); raises if the dictionary lacks one of them."""
    out = []
    for a in answers:
        toks = tokenizer.encode(a, dictionary, add_bos=False, add_eos=True)
        if toks.eq(dictionary.unk()).any():
            raise DataError(f"the dictionary has no entry for the BPE ids of answer {a!r}: "
                            "use OFA's dict.txt or the data's own dict.txt")
        out.append(toks)
    return out


def constraint_mask(target: torch.Tensor, candidates: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """BoolTensor[T, V]: at position t, True for the tokens c[t] of every candidate c whose first t tokens
    equal target[:t] (a trie over the candidates). Positions no candidate reaches allow nothing."""
    mask = torch.zeros(target.numel(), vocab_size, dtype=torch.bool)
    for t in range(target.numel()):
        for c in candidates:
            if c.numel() > t and torch.equal(c[:t], target[:t]):
                mask[t, c[t]] = True
    return mask


class VisionLanguageDataset(FairseqDataset):
    """Shared part: image transform, text encoding, sizes, ordering, epoch, collater.

    Args:
        split: split name (kept in every batch as ``sample["split"]``).
        reader: a random-access reader of records (``len`` and ``reader[i]``).
        dictionary: source and target dictionary (shared).
        tokenizer: ``mue.data.tokenizer.Tokenizer``.
        is_train: training split (permuted order per epoch, training text truncation).
    """

    def __init__(self, split: str, reader, dictionary: Dictionary, tokenizer: Tokenizer,
                 patch_image_size: int = 480, max_src_length: int = 80, max_tgt_length: int = 20,
                 is_train: bool = False, seed: int = 1):
        self.split = split
        self.reader = reader
        self.dict = dictionary
        self.tokenizer = tokenizer
        self.patch_image_size = patch_image_size
        self.max_src_length = max_src_length
        self.max_tgt_length = max_tgt_length
        self.is_train = is_train
        self.seed = seed
        self.epoch = 1
        self.transform = image_transform(patch_image_size, train=is_train)
        self._len = len(reader)
        self._sizes = self.size_bounds()

    # ---- to be defined by subclasses -------------------------------------------------------
    def size_bounds(self):
        """(source, target) token-count upper bounds used for batching."""
        raise NotImplementedError

    def build_example(self, index: int, record: dict, example: dict) -> dict:
        """Complete ``example`` (id, image, ids already set) with source, target and task fields."""
        raise NotImplementedError

    # ---- shared helpers --------------------------------------------------------------------
    def encode(self, text: str, record: dict, what: str, add_bos: bool, add_eos: bool) -> torch.Tensor:
        toks = self.tokenizer.encode(text, self.dict, add_bos=add_bos, add_eos=add_eos)
        if toks.eq(self.dict.unk()).any():
            raise DataError(f"{record.get('source', record.get('uniq_id'))}: the {what} {text!r} has BPE ids "
                            "missing from the dictionary (wrong dict.txt?)")
        return toks

    def image(self, record: dict):
        """(FloatTensor[3, s, s], patch_mask); a record without image gives zeros and mask False."""
        if record.get("image") is None:
            return torch.zeros(3, self.patch_image_size, self.patch_image_size), False
        return self.transform(record["image"]), True

    def with_target(self, example: dict, target_text: str, record: dict) -> dict:
        """Add target (tokens + eos) and prev_output_tokens (bos + tokens) for ``target_text``."""
        toks = self.encode(target_text, record, "target", add_bos=False, add_eos=False)
        example["target"] = torch.cat([toks, toks.new_tensor([self.dict.eos()])])
        example["prev_output_tokens"] = torch.cat([toks.new_tensor([self.dict.bos()]), toks])
        return example

    # ---- FairseqDataset --------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        record = self.reader[index]
        image, mask = self.image(record)
        example = {
            "id": index,
            "uniq_id": str(record.get("uniq_id", index)),
            "image_id": str(record.get("image_id", record.get("uniq_id", index))),
            "patch_image": image,
            "patch_mask": mask,
            "difficulty": int(record.get("difficulty", -1)),
            "split": self.split,
        }
        return self.build_example(index, record, example)

    def __len__(self) -> int:
        return self._len

    def collater(self, samples):
        return collate(samples, self.dict.pad())

    def size(self, index):
        return self._sizes

    def num_tokens(self, index):
        return max(self._sizes)

    def num_tokens_vec(self, indices):
        return np.full(len(indices), max(self._sizes), dtype=np.int64)

    def ordered_indices(self):
        # fairseq calls this inside numpy_seed(seed + epoch): a new order every training epoch
        return np.random.permutation(len(self)) if self.is_train else np.arange(len(self))

    @property
    def can_reuse_epoch_itr_across_epochs(self):
        return not self.is_train  # training batches are rebuilt (re-permuted) every epoch

    def set_epoch(self, epoch):
        self.epoch = epoch


class SnliVeDataset(VisionLanguageDataset):
    """SNLI-VE examples (see the module docstring). ``add_premise``: use OFA's premise prompt."""

    def __init__(self, *args, add_premise: bool = False, group_by_image: bool = False, decoder_prompt: bool = False,
                 **kwargs):
        self.add_premise = add_premise
        self.decoder_prompt = decoder_prompt
        self.group_by_image = group_by_image
        super().__init__(*args, **kwargs)
        self.candidates = encode_answer_candidates(self.tokenizer, self.dict)

    def ordered_indices(self):
        """Evaluation with ``group_by_image``: the pairs of one image in a row (images in the order they
        first appear, pairs in file order within an image), so that batches share images and the encoder
        runs each image once (mue.models.image_reuse). Every example stays, once."""
        if self.is_train or not self.group_by_image or not hasattr(self.reader, "image_id"):
            return super().ordered_indices()
        first = {}
        keys = [first.setdefault(self.reader.image_id(i), len(first)) for i in range(len(self))]
        return np.array(sorted(range(len(self)), key=lambda i: (keys[i], i)), dtype=np.int64)

    def size_bounds(self):
        prompt = SNLI_VE_PREMISE_PROMPT if self.add_premise else SNLI_VE_PROMPT
        words = self.max_src_length * (2 if self.add_premise else 1)
        source = len(prompt.split()) + 2 * words + 2  # ~2 BPE tokens per word at most, plus bos/eos
        return (source, source + 1 if self.decoder_prompt else 3)  # the decoder prompt: source - 2 + answer

    def source_text(self, record: dict) -> str:
        hypothesis = normalize_text(record["hypothesis"], self.max_src_length)
        if not hypothesis:
            raise DataError(f"{record.get('source')}: the hypothesis is empty after normalisation")
        if self.add_premise:
            premise = normalize_text(record["premise"], self.max_src_length)
            return SNLI_VE_PREMISE_PROMPT.format(premise=premise, hypothesis=hypothesis)
        return SNLI_VE_PROMPT.format(hypothesis=hypothesis)

    def build_example(self, index, record, example):
        label = record["label"]
        if label not in SNLI_VE_LABEL_TO_CLASS:
            raise DataError(f"{record.get('source')}: unknown label {label!r}")
        cls = SNLI_VE_LABEL_TO_CLASS[label]
        example["source"] = self.encode(self.source_text(record), record, "source", add_bos=True, add_eos=True)
        example["target"] = self.candidates[cls]
        example["prev_output_tokens"] = torch.cat(
            [self.candidates[cls].new_tensor([self.dict.bos()]), self.candidates[cls][:-1]])
        example["constraint_mask"] = constraint_mask(example["target"], self.candidates, len(self.dict))
        if self.decoder_prompt:  # OFA's prompt type prev_output: the question (no eos) first, loss on the answer only
            prompt = example["source"][:-1]
            example["prev_output_tokens"] = torch.cat([prompt, example["target"][:-1]])
            example["target"] = torch.cat([prompt.new_full((prompt.numel() - 1,), self.dict.pad()), example["target"]])
            example["constraint_mask"] = torch.cat([example["constraint_mask"].new_zeros(
                prompt.numel() - 1, len(self.dict)), example["constraint_mask"]])
        example["answer"] = SNLI_VE_ANSWERS[cls].strip()
        example["label"] = cls
        return example


def merge_references(rows: Iterable[Tuple[str, Sequence[str]]]) -> Dict[str, List[str]]:
    """image id -> references from (image id, references) rows: rows of one image merged, exact duplicates
    dropped, first-seen order (one caption per row and '&&'-joined rows both work)."""
    merged: Dict[str, List[str]] = {}
    for image_id, refs in rows:
        kept = merged.setdefault(image_id, [])
        kept.extend(ref for ref in refs if ref not in kept)
    return merged


class CaptionDataset(VisionLanguageDataset):
    """Caption examples (see the module docstring).

    A training record with several captions (e.g. a COCO json read per image) gives one of them per
    epoch, drawn from (seed, epoch, index); read training data one caption per record to use them all.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cider = None
        self._refs_by_image = None

    def size_bounds(self):
        return (len(CAPTION_PROMPT.split()) * 2 + 2, 2 * self.max_tgt_length + 1)

    def build_example(self, index, record, example):
        captions = record["captions"]
        if not captions:
            raise DataError(f"{record.get('source')}: no caption")
        example["source"] = self.encode(CAPTION_PROMPT, record, "prompt", add_bos=True, add_eos=True)
        if self.is_train:
            pick = 0 if len(captions) == 1 else int(
                np.random.default_rng([self.seed, self.epoch, index]).integers(len(captions)))
            text = normalize_text(captions[pick], self.max_tgt_length)
        else:
            refs = [normalize_text(c) for c in captions]
            example["refs"] = refs
            text = " ".join(refs[0].split()[: self.max_tgt_length])
        if not text:
            raise DataError(f"{record.get('source')}: the caption is empty after normalisation")
        return self.with_target(example, " " + text, record)

    def references(self, index: int) -> List[str]:
        """The normalised references of example ``index`` without decoding its image when the reader
        allows it (OFA TSV: the caption column; json readers: the index entry)."""
        r = self.reader
        if hasattr(r, "tsv") and hasattr(r, "cols"):
            captions = r.tsv.row(index)[r.cols["caption"]].split("&&")
        elif hasattr(r, "entries"):
            captions = r.entries[index]["captions"]
        else:
            captions = r[index]["captions"]
        return [normalize_text(c) for c in captions]

    def image_id(self, index: int) -> str:
        """The image id of example ``index`` (as ``example["image_id"]``) without decoding its image."""
        r = self.reader
        if hasattr(r, "tsv") and hasattr(r, "cols"):
            fields = r.tsv.row(index)
            return str(fields[r.cols["image_id"]] if "image_id" in r.cols else fields[r.cols["uniq_id"]])
        entry = r.entries[index] if hasattr(r, "entries") else r[index]
        return str(entry.get("image_id", entry.get("uniq_id", index)))

    def references_by_image(self) -> Dict[str, List[str]]:
        """image id -> every normalised reference of that image in this split (built once).

        Training files hold one caption per row (several rows per image) or, as OFA's SCST data, all
        of an image's references per row joined with '&&': rows of one image are merged, exact
        duplicates dropped. Self-critical training scores samples against these (mue.criterions.scst)."""
        if self._refs_by_image is None:
            self._refs_by_image = merge_references(self.reference_rows())
        return self._refs_by_image

    def reference_rows(self) -> Iterator[Tuple[str, List[str]]]:
        """(image id, normalised references) of each row, in file order, without decoding images."""
        for i in range(len(self)):
            yield self.image_id(i), self.references(i)

    def corpus_cider(self):
        """A CIDEr-D scorer with the document frequencies of this split's references (built once)."""
        if self._cider is None:
            from mue.evaluation.cider_d import CiderD

            self._cider = CiderD.from_corpus(self.references(i) for i in range(len(self)))
        return self._cider
