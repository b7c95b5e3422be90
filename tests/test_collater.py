"""Collater (CONTRACT.md "A batch") and the datasets that feed it, on tiny hand-made TSV files."""
import base64
import io

import pytest
import torch
from PIL import Image

from mue.data.collater import collate
from mue.data.datasets import CaptionDataset, SnliVeDataset, constraint_mask
from mue.data.dictionary import build_ofa_dictionary
from mue.data.readers import DataError, OfaCaptionTsv, OfaSnliVeTsv
from mue.data.tokenizer import SNLI_VE_ANSWERS, Tokenizer, normalize_text, write_dict_for_corpus

PAD, BOS, EOS = 1, 0, 2


def example(i, src, tgt, v=None, cmask=None, **extra):
    ex = {"id": i, "source": torch.tensor([BOS] + src + [EOS]), "target": torch.tensor(tgt + [EOS]),
          "prev_output_tokens": torch.tensor([BOS] + tgt), "patch_image": torch.full((3, 4, 4), float(i)),
          "patch_mask": i % 2 == 0, **extra}
    if cmask is not None:
        ex["constraint_mask"] = cmask
    return ex


def test_collate_shapes_padding_and_prev_output_tokens():
    samples = [example(0, [5, 6, 7], [8, 9]), example(1, [5], [8, 9, 10, 11])]
    b = collate(samples, PAD)
    net = b["net_input"]
    assert b["id"].tolist() == [0, 1] and b["nsentences"] == 2
    assert net["src_tokens"].tolist() == [[BOS, 5, 6, 7, EOS], [BOS, 5, EOS, PAD, PAD]]
    assert net["src_lengths"].tolist() == [5, 3]
    assert b["target"].tolist() == [[8, 9, EOS, PAD, PAD], [8, 9, 10, 11, EOS]]
    assert net["prev_output_tokens"].tolist() == [[BOS, 8, 9, PAD, PAD], [BOS, 8, 9, 10, 11]]
    assert b["ntokens"] == 3 + 5
    assert net["patch_images"].shape == (2, 3, 4, 4) and net["patch_images"][1].eq(1).all()
    assert net["patch_masks"].dtype == torch.bool and net["patch_masks"].tolist() == [True, False]
    # prev_output_tokens is the target shifted right by one, behind bos, at every non-pad position
    for tgt, prev in zip(b["target"], net["prev_output_tokens"]):
        n = int(tgt.ne(PAD).sum())
        assert prev[0] == BOS and prev[1:n].tolist() == tgt[: n - 1].tolist() and tgt[n - 1] == EOS
    assert "constraint_masks" not in b and collate([], PAD) == {}


def test_collate_task_fields_and_constraint_mask_padding():
    v = 12
    short = torch.zeros(2, v, dtype=torch.bool)
    short[0, 4] = short[1, EOS] = True
    long_ = torch.zeros(3, v, dtype=torch.bool)
    long_[:, 5] = True
    samples = [example(0, [5], [4], cmask=short, answer="yes", label=1, difficulty=3, refs=["a b"], image_id="im0"),
               example(1, [5], [5, 6], cmask=long_, answer="no", label=0, difficulty=-1, refs=["c"], image_id="im1")]
    b = collate(samples, PAD)
    m = b["constraint_masks"]
    assert m.shape == (2, 3, v) and m.dtype == torch.bool
    assert torch.equal(m[0, :2], short) and m[0, 2].all()  # padded position: no constraint
    assert torch.equal(m[1], long_)
    assert b["answers"] == ["yes", "no"] and b["labels"].tolist() == [1, 0]
    assert b["difficulty"].tolist() == [3, -1] and b["refs"] == [["a b"], ["c"]] and b["image_ids"] == ["im0", "im1"]
    with pytest.raises(ValueError, match="mixes"):
        collate([samples[0], example(2, [5], [4], cmask=None) | {"constraint_mask": None}], PAD)
    bad = example(3, [5], [4])
    bad["prev_output_tokens"] = torch.tensor([BOS])[:0]
    with pytest.raises(ValueError, match="example id 3"):
        collate([bad], PAD)


def test_constraint_mask_is_a_trie_over_the_candidates():
    cands = [torch.tensor([5, 6, EOS]), torch.tensor([5, 7, EOS]), torch.tensor([8, EOS])]
    m = constraint_mask(torch.tensor([5, 7, EOS]), cands, 10)
    assert m[0].nonzero().flatten().tolist() == [5, 8]
    assert m[1].nonzero().flatten().tolist() == [6, 7]
    assert m[2].nonzero().flatten().tolist() == [EOS]
    m = constraint_mask(torch.tensor([8, EOS]), cands, 10)
    assert m[1].nonzero().flatten().tolist() == [EOS]


# ---- datasets on hand-made OFA TSV files ------------------------------------------------------


def png_b64(color):
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def make_dict(tmp_path, texts, tok):
    """A small dict.txt covering the normalised ``texts`` (plus both prompts and the answers)."""
    path = tmp_path / "dict.txt"
    write_dict_for_corpus([normalize_text(t) for t in texts], str(path), tok)
    return build_ofa_dictionary(str(path), num_codes=4, num_bins=2)


def test_snli_ve_dataset_examples_and_batch(tmp_path, tok):
    rows = [("u0", "i0", png_b64("red"), "A red Square!", "a picture", "entailment"),
            ("u1", "i1", png_b64("blue"), "two dogs, running", "a picture", "contradiction"),
            ("u2", "i2", png_b64("green"), "it is heavy", "a picture", "neutral")]
    tsv = tmp_path / "valid.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    d = make_dict(tmp_path, [r[3] for r in rows] + [r[4] for r in rows], tok)
    ds = SnliVeDataset("valid", OfaSnliVeTsv(str(tsv)), d, tok, patch_image_size=16, max_src_length=2)
    ex = ds[0]
    assert tok.decode(ex["source"], d) == ' does the image describe " a red "?'  # normalised, 2 words
    assert ex["source"][0] == d.bos() and ex["source"][-1] == d.eos()
    assert [tok.decode(ds[i]["target"], d) for i in range(3)] == [" yes", " no", " maybe"]
    assert [ds[i]["label"] for i in range(3)] == [1, 0, 2] and ds[1]["answer"] == "no"
    assert ex["target"][-1] == d.eos() and ex["prev_output_tokens"][0] == d.bos()
    assert ex["patch_image"].shape == (3, 16, 16) and -1 <= ex["patch_image"].min() <= ex["patch_image"].max() <= 1
    first_tokens = sorted(tok.encode(a, d)[0].item() for a in SNLI_VE_ANSWERS)
    assert ex["constraint_mask"][0].nonzero().flatten().tolist() == first_tokens
    assert ex["constraint_mask"][1].nonzero().flatten().tolist() == [d.eos()]
    b = ds.collater([ds[i] for i in range(3)])
    assert b["constraint_masks"].shape == (3, 2, len(d)) and b["split"] == "valid"
    assert b["net_input"]["src_tokens"].size(0) == 3 and b["labels"].tolist() == [1, 0, 2]
    premise = SnliVeDataset("valid", OfaSnliVeTsv(str(tsv)), d, tok, patch_image_size=16, add_premise=True)
    assert tok.decode(premise[0]["source"], d) == ' can image and text1 " a picture " imply text2 " a red square "?'


def test_caption_dataset_train_and_eval(tmp_path, tok):
    caps = ["A man, riding a Horse on the beach today", "a dog&&A brown DOG runs."]
    train, valid = tmp_path / "train.tsv", tmp_path / "valid.tsv"
    train.write_text(f"t0\timg0\t{caps[0]}\tlabels\t{png_b64('red')}\n")
    valid.write_text(f"v0\timg1\t{caps[1]}\tlabels\t{png_b64('blue')}\n")
    d = make_dict(tmp_path, caps[0].split("&&") + caps[1].split("&&"), tok)
    tr = CaptionDataset("train", OfaCaptionTsv(str(train)), d, tok, patch_image_size=8, max_tgt_length=4,
                        is_train=True)
    ex = tr[0]
    assert tok.decode(ex["target"], d) == " a man riding a"
    assert tok.decode(ex["source"], d) == " what does the image describe?"
    assert "refs" not in ex
    assert tr.ordered_indices().tolist() == [0] and not tr.can_reuse_epoch_itr_across_epochs
    va = CaptionDataset("valid", OfaCaptionTsv(str(valid)), d, tok, patch_image_size=8, max_tgt_length=4)
    ex = va[0]
    assert ex["refs"] == ["a dog", "a brown dog runs"]
    assert tok.decode(ex["target"], d) == " a dog" and ex["image_id"] == "img1" and ex["uniq_id"] == "v0"
    assert va.references(0) == ex["refs"]
    b = va.collater([ex])
    assert b["refs"] == [ex["refs"]] and b["image_ids"] == ["img1"] and b["difficulty"].tolist() == [-1]
    # a dictionary that lacks the words is an error naming the row, not silent <unk>s
    small = make_dict(tmp_path / "small", ["a cat"], tok)
    with pytest.raises(DataError, match=r"valid.tsv:1.*missing from the dictionary"):
        CaptionDataset("valid", OfaCaptionTsv(str(valid)), small, tok, patch_image_size=8)[0]


def test_synthetic_data_through_the_datasets(tmp_path, tok):
    from mue.data.synthetic import generate

    out = generate(str(tmp_path), num_train=2, num_valid=3, num_test=1, image_size=16)
    d = build_ofa_dictionary(out["dict"], num_codes=0, num_bins=0)
    va = CaptionDataset("valid", OfaCaptionTsv(str(tmp_path / "caption" / "valid.tsv")), d, tok, patch_image_size=16)
    b = va.collater([va[i] for i in range(len(va))])
    assert b["net_input"]["patch_images"].shape == (3, 3, 16, 16)
    assert all(len(r) == 5 for r in b["refs"]) and (b["difficulty"] >= 1).all()
    snli = SnliVeDataset("train", OfaSnliVeTsv(str(tmp_path / "snli_ve" / "train.tsv")), d, tok,
                         patch_image_size=16, is_train=True)
    assert len(snli) == 6 and sorted(snli[i]["label"] for i in range(6)) == [0, 0, 1, 1, 2, 2]
