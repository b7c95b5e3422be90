"""Synthetic shapes benchmark: determinism, formats readable by the readers, label classes, difficulty."""
import json
import os
from collections import Counter

import pytest

from mue.data import synthetic
from mue.data.dictionary import build_ofa_dictionary
from mue.data.readers import OfaCaptionTsv, OfaSnliVeTsv
from mue.data.synthetic import Obj, caption_candidates, generate, hypothesis_candidates
from mue.data.tokenizer import SNLI_VE_ANSWERS, SNLI_VE_PROMPT, Tokenizer, normalize_text

N_TRAIN, N_VALID, N_TEST, SIZE = 24, 12, 12, 32


def files_of(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    paths = generate(str(root), seed=1, num_train=N_TRAIN, num_valid=N_VALID, num_test=N_TEST, image_size=SIZE)
    return root, paths


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    root, _ = data
    generate(str(tmp_path / "again"), 1, N_TRAIN, N_VALID, N_TEST, SIZE)
    generate(str(tmp_path / "other"), 2, N_TRAIN, N_VALID, N_TEST, SIZE)
    first, again, other = files_of(root), files_of(tmp_path / "again"), files_of(tmp_path / "other")
    assert len(first) == 3 * 4 + 2 and first == again
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first if k.endswith(".tsv"))


def test_split_streams_are_independent(data, tmp_path):
    root, _ = data
    generate(str(tmp_path / "more"), 1, N_TRAIN + 5, N_VALID, N_TEST, SIZE)
    for rel in [os.path.join("caption", f"{split}.tsv") for split in ("valid", "test")] + ["dict.txt"]:
        assert open(root / rel, "rb").read() == open(tmp_path / "more" / rel, "rb").read()


def test_the_dictionary_is_the_grammars_whatever_the_draw(data, tmp_path):
    """Token indices must not move when a split grows or the seed changes: a bigger dev split would
    otherwise train a different model."""
    root, _ = data
    generate(str(tmp_path / "other"), 5, 7, N_VALID + 9, 3, SIZE, max_objects=7, hypotheses_per_image=6)
    assert (root / "dict.txt").read_bytes() == (tmp_path / "other" / "dict.txt").read_bytes()


def test_a_word_missing_from_the_grammar_list_is_an_error_naming_the_text(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "TEMPLATE_WORDS", [w for w in synthetic.TEMPLATE_WORDS if w != "there"])
    with pytest.raises(ValueError, match=r"wrote '.*there.*'.*TEMPLATE_WORDS"):
        generate(str(tmp_path / "d"), 1, 4, 2, 2, SIZE)


def test_caption_files_read_back(data):
    _, paths = data
    train, valid = OfaCaptionTsv(paths["train"]["caption"]), OfaCaptionTsv(paths["valid"]["caption"])
    assert len(train) == 5 * N_TRAIN and len(valid) == N_VALID
    assert all(len(r["captions"]) == 1 for r in train)
    scenes = [json.loads(line) for line in open(paths["valid"]["scenes"])]
    refs = json.load(open(paths["valid"]["refs"]))
    ref_caps = {}
    for ann in refs["annotations"]:
        ref_caps.setdefault(ann["image_id"], []).append(ann["caption"])
    for r, scene in zip(valid, scenes):
        assert r["image"].size == (SIZE, SIZE) and r["image"].mode == "RGB"
        assert len(r["captions"]) == 5 and r["captions"] == ref_caps[r["image_id"]]
        assert r["image_id"] == scene["image_id"] and r["difficulty"] == len(scene["objects"])
        assert all(len(normalize_text(c).split()) <= 20 for c in r["captions"])
        if r["difficulty"] == 1:  # easy examples name the one object
            o = scene["objects"][0]
            assert all(f"{o['color']} {o['shape']}" in c for c in r["captions"])
    assert [im["id"] for im in refs["images"]] == [r["image_id"] for r in valid]


def test_snli_ve_files_three_classes_and_difficulty(data):
    _, paths = data
    records = [r for split in ("train", "valid", "test") for r in OfaSnliVeTsv(paths[split]["snli_ve"])]
    assert len(records) == 3 * (N_TRAIN + N_VALID + N_TEST)
    assert Counter(r["label"] for r in records) == {label: N_TRAIN + N_VALID + N_TEST
                                                   for label in ("entailment", "contradiction", "neutral")}
    assert {r["difficulty"] for r in records} == set(range(1, 7))
    assert all(r["premise"] and r["hypothesis"] for r in records)


def test_dict_covers_all_text(data):
    _, paths = data
    tok = Tokenizer()
    d = build_ofa_dictionary(paths["dict"])
    assert len(d) < 4 + 1000 + 1 + 8192 + 1000  # a small text vocabulary
    texts = list(SNLI_VE_ANSWERS)
    for r in OfaCaptionTsv(paths["test"]["caption"]):
        texts += [" " + normalize_text(c) for c in r["captions"]]
    for r in OfaSnliVeTsv(paths["test"]["snli_ve"]):
        texts.append(SNLI_VE_PROMPT.format(hypothesis=normalize_text(r["hypothesis"])))
    for text in texts:
        assert d.unk() not in tok.encode(text, d).tolist(), text


def scene_two():
    return [Obj("circle", "red", "small", 5.0, 30.0, 3.0), Obj("square", "blue", "large", 40.0, 31.0, 6.0)]


def test_hypotheses_match_the_scene():
    hyps = hypothesis_candidates(scene_two())
    assert {"there is a red circle", "the red circle is left of the blue square", "there are two objects",
            "there is only one square"} <= set(hyps["entailment"])
    assert {"the red circle is right of the blue square", "there is a blue circle", "there is a red square",
            "there is only one object", "there are two triangles"} <= set(hyps["contradiction"])
    assert "the red circle is made of wood" in hyps["neutral"]
    for a, b in [("entailment", "contradiction"), ("entailment", "neutral"), ("contradiction", "neutral")]:
        assert not set(hyps[a]) & set(hyps[b])


def test_captions_from_the_scene():
    caps = caption_candidates(scene_two())
    assert "a red circle and a blue square" in caps and "two objects: a red circle and a blue square" in caps
    assert "a red circle left of a blue square" in caps
    one = caption_candidates([Obj("triangle", "orange", "large", 10.0, 10.0, 5.0)])
    assert "an orange triangle" in one and all("orange triangle" in c for c in one)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--out", "--seed", "--num-train", "--num-valid", "--num-test",
                                              "--image-size"))
    synthetic.main(["--out", str(tmp_path), "--seed", "3", "--num-train", "2", "--num-valid", "1",
                    "--num-test", "1", "--image-size", "24"])
    assert len(OfaSnliVeTsv(str(tmp_path / "snli_ve" / "train.tsv"))) == 6
    assert json.load(open(tmp_path / "meta.json"))["seed"] == 3


def test_sampled_hypotheses_are_true_false_or_undecidable_as_labelled():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        objects = synthetic.sample_scene(rng, 64)
        cands = hypothesis_candidates(objects)
        for label in synthetic.LABELS:
            assert synthetic.sample_hypothesis(rng, objects, label, 64, 6) in cands[label], label


def test_wording_does_not_give_entailment_or_contradiction_away(tmp_path):
    """SNLI-VE must need the image: predicting entailment vs contradiction from the hypothesis's template
    (colours, shapes, sizes and numbers blanked), by majority vote over the training rows, stays near
    chance. The first generator allowed 80 % this way, and the models learned exactly that and ignored
    the images."""
    import re

    generate(str(tmp_path), seed=3, num_train=400, num_valid=200, num_test=1, image_size=16)
    words = r"\b(" + "|".join([*synthetic.COLORS, *synthetic.SHAPES, *(s + "s" for s in synthetic.SHAPES),
                                *synthetic.SIZES, *synthetic.NUMBERS]) + r")\b"

    def rows(split):
        for line in open(tmp_path / "snli_ve" / f"{split}.tsv", encoding="utf-8"):
            cols = line.rstrip("\n").split("\t")
            if cols[5] != "neutral":
                yield re.sub(words, "X", cols[3]), cols[5]

    votes = {}
    for template, label in rows("train"):
        votes.setdefault(template, Counter())[label] += 1
    valid = list(rows("valid"))
    hits = sum(template in votes and votes[template].most_common(1)[0][0] == label for template, label in valid)
    assert len(valid) == 400 and hits / len(valid) < 0.62


def test_several_hypotheses_per_image_balanced_and_distinct(tmp_path):
    paths = generate(str(tmp_path), seed=2, num_train=30, num_valid=1, num_test=1, image_size=16,
                     hypotheses_per_image=6)
    by_image = {}
    for r in OfaSnliVeTsv(paths["train"]["snli_ve"]):
        by_image.setdefault(r["image_id"], []).append((r["label"], r["hypothesis"]))
    assert len(by_image) == 30
    for pairs in by_image.values():
        assert Counter(label for label, _ in pairs) == {"entailment": 2, "contradiction": 2, "neutral": 2}
        assert len(set(pairs)) == 6
    with pytest.raises(ValueError, match="multiple of 3"):
        generate(str(tmp_path), num_train=1, num_valid=1, num_test=1, image_size=16, hypotheses_per_image=4)


def test_hypotheses_do_not_change_the_scenes(tmp_path):
    """The hypotheses have their own random stream: asking for more keeps every image and caption."""
    three = generate(str(tmp_path / "a"), seed=2, num_train=5, num_valid=2, num_test=2, image_size=16)
    six = generate(str(tmp_path / "b"), seed=2, num_train=5, num_valid=2, num_test=2, image_size=16,
                   hypotheses_per_image=6)
    for split in ("train", "valid", "test"):
        assert open(three[split]["caption"]).read() == open(six[split]["caption"]).read()
