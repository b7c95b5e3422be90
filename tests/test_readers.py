"""Readers of OFA TSV, COCO json (Karpathy and annotation formats) and SNLI-VE jsonl; bad-input handling."""
import base64
import io
import json
import logging
import random

import pytest
from PIL import Image

from mue.data.readers import (CocoCaptionJson, DataError, OfaCaptionTsv, OfaSnliVeTsv, SnliVeJsonl,
                              TsvReader)


def png_b64(color, size=(6, 4)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


RED, BLUE = png_b64((255, 0, 0)), png_b64((0, 0, 255))


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------- TsvReader
def test_tsv_reader_lazy_index_random_access(tmp_path):
    n = 2000
    path = write(tmp_path / "big.tsv", [f"id{i}\t{'x' * (i % 37)}\tv{i * 7}" for i in range(n)])
    reader = TsvReader(path, selected_cols="2,0")
    assert len(reader) == n and reader.num_cols == 3
    order = list(range(n))
    random.Random(0).shuffle(order)
    for i in order:
        assert reader.row(i) == [f"v{i * 7}", f"id{i}"]
    assert reader.line_number(5) == 6
    # rows come from disk when read, not from memory: rewrite one row in place (same length) and read it
    raw = open(path, "rb").read()
    start = raw.index(b"id1234\t")
    patched = raw[:start] + b"ID1234" + raw[start + 6:]
    open(path, "wb").write(patched)
    assert reader.row(1234)[1] == "ID1234"
    with pytest.raises(IndexError):
        reader.row(n)


def test_tsv_reader_is_safe_under_concurrent_reads(tmp_path):
    """fairseq prefetches batches in a thread while a criterion may read rows of the same reader."""
    import threading

    n = 500
    path = write(tmp_path / "shared.tsv", [f"id{i}\t{'y' * (i % 53)}\tv{i}" for i in range(n)])
    reader = TsvReader(path)
    errors = []

    def read_all(seed):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        try:
            for _ in range(4):
                for i in order:
                    assert reader.row(i) == [f"id{i}", "y" * (i % 53), f"v{i}"]
        except Exception as err:  # noqa: BLE001 -- collected and reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=read_all, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_tsv_reader_column_count_error_names_file_line(tmp_path):
    path = write(tmp_path / "a.tsv", ["a\tb\tc", "d\te\tf", "g\th"])
    with pytest.raises(DataError, match=r"a\.tsv:3: expected 3 columns, got 2"):
        TsvReader(path)
    reader = TsvReader(path, skip_bad=True)
    assert len(reader) == 2 and reader.skipped == [(3, "expected 3 columns, got 2")]
    with pytest.raises(DataError, match="file not found"):
        TsvReader(str(tmp_path / "missing.tsv"))


def test_tsv_reader_blank_lines_and_allowed_counts(tmp_path):
    path = write(tmp_path / "b.tsv", ["a\tb", "", "c\td"])
    reader = TsvReader(path, num_cols=(2, 3))
    assert len(reader) == 2 and reader.row(1) == ["c", "d"] and reader.line_number(1) == 3
    with pytest.raises(DataError, match=r"b\.tsv:1: expected 4 columns, got 2"):
        TsvReader(path, num_cols=4)


# ------------------------------------------------------------------------------------------- OFA caption
def test_ofa_caption_tsv_records(tmp_path):
    path = write(tmp_path / "cap.tsv", [
        f"u1\timg1\ta red box&&a box that is red\tlabels\t{RED}",
        f"u2\timg2\ta blue box\tlabels\t{BLUE}",
    ])
    reader = OfaCaptionTsv(path)
    assert len(reader) == 2
    r0, r1 = reader[0], reader[1]
    assert (r0["uniq_id"], r0["image_id"], r0["captions"], r0["difficulty"]) == (
        "u1", "img1", ["a red box", "a box that is red"], -1)
    assert r0["image"].mode == "RGB" and r0["image"].size == (6, 4)
    assert r0["image"].getpixel((0, 0)) == (255, 0, 0) and r1["image"].getpixel((2, 2)) == (0, 0, 255)
    assert r1["source"].endswith("cap.tsv:2")
    ofa = OfaCaptionTsv(path, selected_cols="0,4,2")  # OFA's own selection: image_id = uniq_id
    assert ofa[1]["image_id"] == "u2" and ofa[1]["captions"] == ["a blue box"]


def test_ofa_caption_tsv_difficulty_column(tmp_path):
    path = write(tmp_path / "cap.tsv", [f"u1\ti1\tx\tl\t{RED}\t3", f"u2\ti2\ty\tl\t{BLUE}\t5"])
    assert [OfaCaptionTsv(path)[i]["difficulty"] for i in range(2)] == [3, 5]
    bad = write(tmp_path / "bad.tsv", [f"u1\ti1\tx\tl\t{RED}\thard"])
    with pytest.raises(DataError, match=r"bad\.tsv:1: difficulty must be an integer"):
        OfaCaptionTsv(bad)


@pytest.mark.parametrize("line, message", [
    (f"u2\ti2\tcap\t{RED}", "expected 5 columns, got 4"),
    (f"u2\ti2\t \tl\t{RED}", "empty caption"),
    (f"u2\ti2\ta&&\tl\t{RED}", "empty caption among"),
    ("u2\ti2\tcap\tl\t", "empty image column"),
])
def test_ofa_caption_tsv_bad_rows(tmp_path, line, message, caplog):
    path = write(tmp_path / "c.tsv", [f"u1\ti1\tok\tl\t{RED}", line, f"u3\ti3\tok\tl\t{BLUE}"])
    with pytest.raises(DataError, match=rf"c\.tsv:2: {message}"):
        OfaCaptionTsv(path)
    with caplog.at_level(logging.WARNING):
        reader = OfaCaptionTsv(path, skip_bad=True)
    assert len(reader) == 2 and [r["uniq_id"] for r in reader] == ["u1", "u3"]
    assert len(reader.skipped) == 1 and reader.skipped[0][0] == 2 and message in reader.skipped[0][1]
    assert "skipped 1 bad entries" in caplog.text


def test_corrupt_base64_image(tmp_path):
    junk = base64.b64encode(b"this is not an image").decode()
    path = write(tmp_path / "c.tsv", [f"u1\ti1\tok\tl\t{RED}", f"u2\ti2\tok\tl\t{junk}"])
    reader = OfaCaptionTsv(path)
    assert len(reader) == 2  # images are decoded when read
    with pytest.raises(DataError, match=r"c\.tsv:2: cannot decode the base64 image"):
        reader[1]
    lenient = OfaCaptionTsv(path, skip_bad=True)
    assert lenient[1]["image"] is None and lenient[0]["image"] is not None
    assert [w for w, _ in lenient.skipped] == [2]
    verified = OfaCaptionTsv(path, skip_bad=True, verify_images=True)
    assert len(verified) == 1 and verified.skipped[0][0] == 2
    with pytest.raises(DataError, match=r"c\.tsv:2: cannot decode"):
        OfaCaptionTsv(path, verify_images=True)


# ------------------------------------------------------------------------------------------- OFA SNLI-VE
def test_ofa_snli_ve_tsv(tmp_path):
    path = write(tmp_path / "ve.tsv", [
        f"p1\tim1\t{RED}\ta red thing\ta red square on white\tentailment",
        f"p2\tim1\t{RED}\tit is blue\ta red square on white\tcontradiction",
        f"p3\tim2\t{BLUE}\tit is made of wood\t\tneutral",
    ])
    reader = OfaSnliVeTsv(path)
    assert len(reader) == 3
    r = reader[1]
    assert (r["uniq_id"], r["image_id"], r["hypothesis"], r["premise"], r["label"], r["difficulty"]) == (
        "p2", "im1", "it is blue", "a red square on white", "contradiction", -1)
    assert reader[2]["premise"] == "" and reader[2]["image"].getpixel((1, 1)) == (0, 0, 255)
    assert OfaSnliVeTsv(path, selected_cols="0,2,3,4,5")[0]["image_id"] == "p1"


def test_ofa_snli_ve_unknown_label_and_skip(tmp_path):
    path = write(tmp_path / "ve.tsv", [
        f"p1\tim1\t{RED}\th\tp\tentailment\t1",
        f"p2\tim1\t{RED}\th\tp\tmaybe\t2",
        f"p3\tim1\t{RED}\t\tp\tneutral\t2",
        f"p4\tim1\t{RED}\th\tp\tneutral\t4",
    ])
    with pytest.raises(DataError, match=r"ve\.tsv:2: unknown label 'maybe'"):
        OfaSnliVeTsv(path)
    reader = OfaSnliVeTsv(path, skip_bad=True)
    assert [r["uniq_id"] for r in reader] == ["p1", "p4"] and [r["difficulty"] for r in reader] == [1, 4]
    assert [w for w, _ in reader.skipped] == [2, 3] and "empty hypothesis" in reader.skipped[1][1]


# ------------------------------------------------------------------------------------------------- COCO
def make_images(folder, names):
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 5), (10 * k, 0, 0)).save(path)


def karpathy(tmp_path):
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 11,
         "sentences": [{"raw": "A cat."}, {"raw": "A small cat"}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "cocoid": 12,
         "sentences": [{"raw": "A dog"}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "restval", "cocoid": 13,
         "sentences": [{"raw": "A bird"}, {"raw": "Two birds"}]},
    ]
    make_images(tmp_path / "coco", ["val2014/a.jpg", "train2014/b.jpg", "val2014/c.jpg"])
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return str(path), str(tmp_path / "coco")


def test_karpathy_json(tmp_path):
    path, folder = karpathy(tmp_path)
    test = CocoCaptionJson(path, folder, "test")
    assert len(test) == 1
    r = test[0]
    assert (r["uniq_id"], r["image_id"], r["captions"], r["difficulty"]) == ("11", "11", ["A cat.", "A small cat"], -1)
    assert r["image"].size == (5, 5)
    assert [r["image_id"] for r in CocoCaptionJson(path, folder, "train")] == ["12"]
    assert [r["image_id"] for r in CocoCaptionJson(path, folder, "train", include_restval=True)] == ["12", "13"]
    per = CocoCaptionJson(path, folder, "restval", per_caption=True)
    assert [(r["uniq_id"], r["captions"]) for r in per] == [("13_0", ["A bird"]), ("13_1", ["Two birds"])]
    with pytest.raises(DataError, match="needs split="):
        CocoCaptionJson(path, folder)


def test_coco_annotation_json(tmp_path):
    make_images(tmp_path / "imgs", ["x.jpg", "y.jpg"])
    data = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 2, "id": 5, "caption": "two"}, {"image_id": 1, "id": 6, "caption": "one"},
                            {"image_id": 2, "id": 7, "caption": "deux"}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    reader = CocoCaptionJson(str(path), str(tmp_path / "imgs"), "val")
    assert [(r["image_id"], r["captions"]) for r in reader] == [("1", ["one"]), ("2", ["two", "deux"])]
    assert reader[1]["image"].getpixel((0, 0)) == (10, 0, 0)


def test_coco_bad_entries(tmp_path):
    path, folder = karpathy(tmp_path)
    data = json.loads(open(path).read())
    data["images"][0]["sentences"][1]["raw"] = "  "
    data["images"].append({"filename": "gone.jpg", "split": "test", "cocoid": 99, "sentences": [{"raw": "x"}]})
    open(path, "w").write(json.dumps(data))
    with pytest.raises(DataError, match=r"dataset_coco\.json: image id 11: empty caption #1"):
        CocoCaptionJson(path, folder, "test")
    reader = CocoCaptionJson(path, folder, "test", skip_bad=True)
    assert len(reader) == 0 and [w for w, _ in reader.skipped] == ["11", "99"]
    assert "image file not found" in reader.skipped[1][1]
    (tmp_path / "notjson.json").write_text("{oops")
    with pytest.raises(DataError, match=r"notjson\.json: not valid json"):
        CocoCaptionJson(str(tmp_path / "notjson.json"), folder, "test")


def test_unreadable_image_file(tmp_path):
    path, folder = karpathy(tmp_path)
    (tmp_path / "coco" / "val2014" / "a.jpg").write_bytes(b"not a jpeg")
    reader = CocoCaptionJson(path, folder, "test")
    with pytest.raises(DataError, match=r"image id 11: cannot read image"):
        reader[0]
    assert CocoCaptionJson(path, folder, "test", skip_bad=True)[0]["image"] is None
    assert len(CocoCaptionJson(path, folder, "test", skip_bad=True, verify_images=True)) == 0


# ---------------------------------------------------------------------------------------------- SNLI-VE
def test_snli_ve_jsonl_id_spellings(tmp_path):
    make_images(tmp_path / "flickr", ["100.jpg", "200.jpg", "300.jpg"])
    rows = [
        {"Flickr30K_ID": "100", "gold_label": "entailment", "sentence1": "P1", "sentence2": "H1", "pairID": "a"},
        {"Flickr30kID": 200, "gold_label": "neutral", "sentence1": "P2", "sentence2": "H2", "pairID": "b"},
        {"Flikr30kID": "300.jpg", "gold_label": "contradiction", "sentence1": "P3", "sentence2": "H3",
         "pairID": "c"},
    ]
    path = write(tmp_path / "snli_ve_dev.jsonl", [json.dumps(r) for r in rows])
    reader = SnliVeJsonl(path, str(tmp_path / "flickr"))
    got = [(r["uniq_id"], r["image_id"], r["hypothesis"], r["premise"], r["label"]) for r in reader]
    assert got == [("a", "100", "H1", "P1", "entailment"), ("b", "200", "H2", "P2", "neutral"),
                   ("c", "300", "H3", "P3", "contradiction")]
    assert reader[1]["image"].getpixel((0, 0)) == (10, 0, 0) and reader[0]["difficulty"] == -1


@pytest.mark.parametrize("row, message", [
    ('{"Flickr30K_ID": "100", "gold_label": "-", "sentence1": "p", "sentence2": "h", "pairID": "x"}',
     "unknown label '-'"),
    ('{"Flickr30K_ID": "404", "gold_label": "neutral", "sentence1": "p", "sentence2": "h", "pairID": "x"}',
     "image file not found"),
    ('{"gold_label": "neutral", "sentence1": "p", "sentence2": "h", "pairID": "x"}', "no image id"),
    ('{"Flickr30K_ID": "100", "gold_label": "neutral", "sentence1": "p", "pairID": "x"}', "missing key"),
    ('{"Flickr30K_ID": "100", "gold_label": "neutral", "sentence1": "p", "sentence2": "", "pairID": "x"}',
     "empty hypothesis"),
    ("{broken", "not valid json"),
])
def test_snli_ve_jsonl_bad_lines(tmp_path, row, message):
    make_images(tmp_path / "flickr", ["100.jpg"])
    good = '{"Flickr30K_ID": "100", "gold_label": "neutral", "sentence1": "p", "sentence2": "h", "pairID": "g"}'
    path = write(tmp_path / "ve.jsonl", [good, row, good])
    with pytest.raises(DataError, match=rf"ve\.jsonl:2: {message}"):
        SnliVeJsonl(path, str(tmp_path / "flickr"))
    reader = SnliVeJsonl(path, str(tmp_path / "flickr"), skip_bad=True)
    assert len(reader) == 2 and [w for w, _ in reader.skipped] == [2]


def test_first_row_with_wrong_count(tmp_path):
    path = write(tmp_path / "c.tsv", [f"u1\ti1\tcap\t{RED}", f"u2\ti2\tok\tl\t{BLUE}"])
    with pytest.raises(DataError, match=r"c\.tsv:1: expected 5 or 6 columns, got 4"):
        OfaCaptionTsv(path)
    assert [r["uniq_id"] for r in OfaCaptionTsv(path, skip_bad=True)] == ["u2"]


def test_readers_pickle_for_dataloader_workers(tmp_path):
    import pickle
    path = write(tmp_path / "c.tsv", [f"u1\ti1\tcap\tl\t{RED}", f"u2\ti2\tok\tl\t{BLUE}"])
    reader = OfaCaptionTsv(path)
    assert reader[0]["uniq_id"] == "u1"  # opens the file handle
    clone = pickle.loads(pickle.dumps(reader))
    assert clone[1]["uniq_id"] == "u2" and clone[1]["image"].getpixel((0, 0)) == (0, 0, 255)


def test_image_transform_on_a_record(tmp_path):
    import pickle
    import torch
    from mue.data.transforms import image_transform
    path = write(tmp_path / "c.tsv", [f"u1\ti1\tcap\tl\t{RED}"])
    image = OfaCaptionTsv(path)[0]["image"]
    t = image_transform(16)
    x = t(image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    gray = t(Image.new("L", (7, 3), 255))
    assert gray.shape == (3, 16, 16) and torch.allclose(gray, torch.ones_like(gray))
    aug = pickle.loads(pickle.dumps(image_transform(16, train=True, augment=True)))
    assert aug(image).shape == (3, 16, 16)
    assert torch.equal(image_transform(16, train=True)(image), x)  # no augmentation unless asked


# ------------------------------------------------------------------------------------ decompression bombs
@pytest.fixture(scope="module")
def bomb_png():
    """A 15000 x 15000 PNG of 27 KB (1 bit per pixel, all black): over twice Pillow's default
    decompression-bomb limit (89.5 M pixels), so Pillow refuses to open it."""
    buf = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buf, format="PNG")
    return buf.getvalue()


def test_decompression_bomb_in_tsv_is_a_bad_row(tmp_path, bomb_png):
    bomb = base64.b64encode(bomb_png).decode("ascii")
    path = write(tmp_path / "c.tsv", [f"u1\ti1\tok\tl\t{RED}", f"u2\ti2\tok\tl\t{bomb}"])
    with pytest.raises(DataError, match=r"c\.tsv:2: the base64 image is 15000 x 15000 pixels, over the "
                                        r"178,956,970 pixels that Pillow decodes .*: resize the image"):
        OfaCaptionTsv(path)[1]
    lenient = OfaCaptionTsv(path, skip_bad=True)  # skipped and counted like any undecodable image
    assert lenient[1]["image"] is None and lenient[0]["image"] is not None
    assert [w for w, _ in lenient.skipped] == [2] and "15000 x 15000" in lenient.skipped[0][1]
    verified = OfaCaptionTsv(path, skip_bad=True, verify_images=True)
    assert len(verified) == 1 and verified.skipped[0][0] == 2


def test_decompression_bomb_in_image_folder(tmp_path, bomb_png):
    path, folder = karpathy(tmp_path)
    image = tmp_path / "coco" / "val2014" / "a.jpg"  # a PNG under a .jpg name: Pillow goes by content
    image.write_bytes(bomb_png)
    with pytest.raises(DataError, match=rf"image id 11: image {image} is 15000 x 15000 pixels, over .*Pillow"):
        CocoCaptionJson(path, folder, "test")[0]
    lenient = CocoCaptionJson(path, folder, "test", skip_bad=True)
    assert lenient[0]["image"] is None and "15000 x 15000" in lenient.skipped[0][1]


def test_image_between_one_and_two_times_the_limit_decodes_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5 * 5)  # 6 x 4 = 24 pixels: under it
    path = write(tmp_path / "c.tsv", [f"u1\ti1\tok\tl\t{RED}", f"u2\ti2\tok\tl\t{png_b64((1, 2, 3), (7, 5))}"])
    reader = OfaCaptionTsv(path)
    assert reader[0]["image"].size == (6, 4) and not caplog.records
    with pytest.warns(Image.DecompressionBombWarning), caplog.at_level(logging.WARNING):
        assert reader[1]["image"].size == (7, 5)  # 35 pixels: Pillow warns only, as by default
    assert "c.tsv:2: the base64 image is 7 x 5 pixels, over Pillow's decompression-bomb warning limit" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 17)  # 35 > 2 x 17: refused
    with pytest.raises(DataError, match=r"c\.tsv:2: the base64 image is 7 x 5 pixels, over the 34 pixels"):
        reader[1]
