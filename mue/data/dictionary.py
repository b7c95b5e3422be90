"""OFA's vocabulary as a fairseq Dictionary: text BPE entries, then <mask>, image codes and location bins.

Layout (docs/OFA.md, "Dictionary"): 0-3 ``<s> <pad> </s> <unk>``, then the lines of dict.txt (50,260 for OFA), then
``<mask>``, ``<code_0..num_codes-1>``, ``<bin_0..num_bins-1>``; 59,457 entries with OFA's dict.txt.
"""
import os

from fairseq.data import Dictionary

from mue.data.readers import DataError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
OFA_DICT_LINES = 50260  # 50,257 GPT-2 BPE ids + madeupword0000..0002, as in fairseq's gpt2 dict.txt
OFA_NUM_CODES = 8192
OFA_NUM_BINS = 1000
OFA_VOCAB_SIZE = 4 + OFA_DICT_LINES + 1 + OFA_NUM_CODES + OFA_NUM_BINS  # 59,457


def check_dict_file(path: str) -> None:
    """Raise DataError (file and line) unless ``path`` is a fairseq dict.txt: "TOKEN COUNT [#fairseq:overwrite]"."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: dictionary file not found")
    seen = {}
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e})") from None
    for line_no, line in enumerate(lines, start=1):
        word, sep, count = line.rstrip().rpartition(" ")
        overwrite = count == "#fairseq:overwrite"
        if overwrite:
            word, sep, count = word.rpartition(" ")
        if not sep or not word or not count.lstrip("-").isdigit():
            raise DataError(f"{path}:{line_no}: expected 'TOKEN COUNT', got {line.rstrip()!r}")
        if word in SPECIALS and not overwrite:
            raise DataError(f"{path}:{line_no}: {word!r} is a built-in special symbol")
        if word in seen and not overwrite:
            raise DataError(f"{path}:{line_no}: duplicate token {word!r} (first on line {seen[word]})")
        seen.setdefault(word, line_no)


def add_ofa_symbols(d: Dictionary, num_codes: int = OFA_NUM_CODES, num_bins: int = OFA_NUM_BINS) -> Dictionary:
    """Append ``<mask>``, the image codes and the location bins, in OFA's order."""
    d.add_symbol("<mask>")
    for i in range(num_codes):
        d.add_symbol(f"<code_{i}>")
    for i in range(num_bins):
        d.add_symbol(f"<bin_{i}>")
    return d


def build_ofa_dictionary(dict_txt_path: str, num_codes: int = OFA_NUM_CODES,
                         num_bins: int = OFA_NUM_BINS) -> Dictionary:
    """Load a fairseq dict.txt and append OFA's extra symbols (59,457 entries with OFA's file)."""
    check_dict_file(str(dict_txt_path))
    return add_ofa_symbols(Dictionary.load(str(dict_txt_path)), num_codes, num_bins)


def placeholder_ofa_dictionary() -> Dictionary:
    """A 59,457-entry dictionary with OFA's layout, for building models without OFA's dict.txt.

    Indices 4..50263 hold the GPT-2 BPE ids "0".."50256" in numeric order and then madeupword0000..0002,
    so the BPE tokenizer works with it; OFA's own dict.txt orders the ids by frequency, so weights of an
    official checkpoint need OFA's dict.txt (``build_ofa_dictionary``).
    """
    d = Dictionary()
    for i in range(OFA_DICT_LINES - 3):
        d.add_symbol(str(i))
    for i in range(3):
        d.add_symbol(f"madeupword{i:04d}")
    return add_ofa_symbols(d)
