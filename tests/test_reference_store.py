"""Reference stores (mue.data.reference_store) and `mue_scst --scst-refs`: the file round trip, lookups of
a batch's images only, rebuilding a stale store, clear errors on bad files, the build-refs command, and
the criterion giving the same references and rewards with and without the store."""
import logging
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import mue  # noqa: F401  (registers tasks, models, criterions)
from mue.criterions import scst
from mue.data import reference_store as rs
from mue.data.datasets import CaptionDataset
from mue.data.readers import DataError

# image id -> raw captions, one per row (image "2" also as an OFA SCST-style '&&' row, with a duplicate)
ROWS = [("1", "A dog, running."), ("2", "Two CATS on a mat"), ("1", "a dog running"), ("1", "The dog runs!"),
        ("3", "a red square"), ("2", "two cats on a mat&&cats sleeping")]
EXPECTED = {"1": ["a dog running", "the dog runs"], "2": ["two cats on a mat", "cats sleeping"],
            "3": ["a red square"]}  # normalised, merged per image, duplicates dropped, first-seen order


def write_tsv(path, rows=ROWS):
    """An OFA caption TSV (uniq-id, image-id, caption, labels, image); images are never decoded here."""
    path.write_text("".join(f"{image}_{k}\t{image}\t{caption}\tdog\tnot-an-image\n"
                            for k, (image, caption) in enumerate(rows)), encoding="utf-8")
    return path


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "train.tsv")


# ---- the file --------------------------------------------------------------------------------------


def test_round_trip_equals_references_by_image(tsv, tmp_path):
    dataset = rs.reader_dataset(str(tsv))
    by_image = dataset.references_by_image()
    assert by_image == EXPECTED  # the dataset's own merge, checked by hand
    store = rs.build_reference_store(dataset, str(tmp_path / "refs.sqlite"))
    assert not list(tmp_path.glob("refs.sqlite.tmp*"))  # written under a temporary name, then renamed
    again = rs.ReferenceStore(str(tmp_path / "refs.sqlite"))  # a fresh reader of the file
    for s in (store, again):
        assert s.refs(["2", "3", "1", "2"]) == [by_image["2"], by_image["3"], by_image["1"], by_image["2"]]
        assert len(s) == 3 and s.num_references == 5
        assert list(s.iter_all()) == list(by_image.values())  # every image once, in first-seen order
        assert s.meta["source_path"] == os.path.realpath(tsv)
        assert s.stale_reason(str(tsv)) is None
    # rows instead of a dataset: merged the same way; no source recorded, so never stale
    rows = rs.build_reference_store([("a", ["x y"]), ("b", ["z"]), ("a", ["x y", "w"])], tmp_path / "rows.sqlite")
    assert rows.refs(["a", "b"]) == [["x y", "w"], ["z"]] and rows.stale_reason(str(tsv)) is None


def test_a_batch_is_one_indexed_query(tmp_path, monkeypatch):
    store = rs.build_reference_store(((str(i), [f"caption {i}"]) for i in range(2000)), tmp_path / "r.sqlite")
    assert store._conn is None  # building does not open it for reading; nothing is read before the first use
    assert len(store) == 2000
    monkeypatch.setattr(rs.ReferenceStore, "iter_all", lambda self: pytest.fail("read the whole store"))
    statements = []
    store._db().set_trace_callback(statements.append)
    assert store.refs([7, "1999", 7]) == [["caption 7"], ["caption 1999"], ["caption 7"]]
    assert statements == ["SELECT image_id, refs FROM refs WHERE image_id IN ('7','1999')"]  # one query, ids once
    plan = " ".join(str(row[-1]) for row in store._db().execute("EXPLAIN QUERY PLAN " + statements[0]))
    assert "USING" in plan and "SCAN" not in plan, plan  # the primary-key index, not a scan of the table
    with pytest.raises(DataError, match=r"r\.sqlite: no references for image id\(s\) 2000, x: .*delete it"):
        store.refs(["5", "2000", "x"])


def test_stale_store_is_rebuilt_with_a_warning(tsv, tmp_path, caplog, monkeypatch):
    path = str(tmp_path / "refs.sqlite")
    built = rs.open_reference_store(path, rs.reader_dataset(str(tsv)))  # missing: built
    assert built.refs(["1"]) == [EXPECTED["1"]]

    def no_build(*args, **kwargs):
        raise AssertionError("an up-to-date store was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(rs, "build_reference_store", no_build)
        assert rs.open_reference_store(path, rs.reader_dataset(str(tsv))).refs(["3"]) == [EXPECTED["3"]]

    write_tsv(tsv, ROWS + [("4", "a new image")])  # the training file changed: size and mtime
    with caplog.at_level(logging.WARNING):
        store = rs.open_reference_store(path, rs.reader_dataset(str(tsv)))
    assert "is stale" in caplog.text and "changed since it was built" in caplog.text
    assert store.refs(["4"]) == [["a new image"]] and len(store) == 4

    stat = os.stat(tsv)  # same size, another modification time: stale too
    os.utime(tsv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert "mtime" in rs.ReferenceStore(path).stale_reason(str(tsv))
    other = write_tsv(tmp_path / "other.tsv")
    assert "not " + os.path.realpath(other) in rs.ReferenceStore(path).stale_reason(str(other))

    dataset = rs.reader_dataset(str(tsv))
    os.remove(tsv)  # cannot be checked or rebuilt: a clear error naming the source
    with pytest.raises(DataError, match=r"train\.tsv: cannot read the references' source file"):
        rs.open_reference_store(path, dataset)


def test_unwritable_store_path_is_a_clear_error(tsv, tmp_path):
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "a_file" / "refs.sqlite"  # its folder cannot be made (even as root)
    with pytest.raises(DataError, match=rf"{path}: cannot write the reference store .*writable"):
        rs.open_reference_store(str(path), rs.reader_dataset(str(tsv)))


def test_corrupt_or_foreign_files_are_data_errors(tsv, tmp_path):
    path = tmp_path / "refs.sqlite"
    path.write_bytes(b"this is not sqlite at all, " * 100)
    store = rs.ReferenceStore(str(path))  # lazy: nothing read yet
    with pytest.raises(DataError, match=rf"{path}: not a mue reference store .*delete it"):
        store.refs(["1"])
    with pytest.raises(DataError, match=rf"{path}: not a mue reference store"):
        rs.open_reference_store(str(path), rs.reader_dataset(str(tsv)))  # never overwritten silently
    assert path.read_bytes().startswith(b"this is not sqlite")

    path.unlink()
    with sqlite3.connect(path) as conn:  # an SQLite file of something else
        conn.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(DataError, match=rf"{path}: not a mue reference store \(no such table: meta\)"):
        len(rs.ReferenceStore(str(path)))
    with sqlite3.connect(path) as conn:  # the right tables, another version
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("CREATE TABLE refs (image_id TEXT PRIMARY KEY, refs TEXT)")
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("format", rs.FORMAT), ("version", "99")])
    with pytest.raises(DataError, match=rf"{path}: not a mue-reference-store version 1 file .*'99'"):
        len(rs.ReferenceStore(str(path)))
    with pytest.raises(DataError, match=r"missing\.sqlite: no reference store file there"):
        rs.ReferenceStore(str(tmp_path / "missing.sqlite")).refs(["1"])


# ---- the command -----------------------------------------------------------------------------------


def test_build_refs_command(tsv, tmp_path, capsys):
    rs.main(["build-refs", str(tsv)])
    default = f"{tsv}.refs.sqlite"  # next to the data
    assert capsys.readouterr().out.strip() == f"{default}: 3 images, 5 references from {tsv}"
    assert rs.ReferenceStore(default).refs(["2"]) == [EXPECTED["2"]]
    # the real entry point, as the docs spell it; --out elsewhere, and OFA's 3-column selection
    out = tmp_path / "stores" / "train_refs.sqlite"
    result = subprocess.run([sys.executable, "-m", "mue.data.reference_store", "build-refs", str(tsv), "--out",
                             str(out), "--selected-cols", "0,4,2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{out}: 6 images, 7 references from {tsv}"  # image_id = uniq_id
    assert "Warning" not in result.stderr, result.stderr
    with pytest.raises(DataError, match=r"nothing\.tsv: file not found"):
        rs.main(["build-refs", str(tmp_path / "nothing.tsv")])


# ---- criterion mue_scst --scst-refs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), num_train=8, num_valid=2, num_test=2, image_size=32)
    return root / "caption"


def setup(data_dir, *criterion_args):
    argv = [str(data_dir), "--task", "mue_caption", "--arch", "mue_ofa_micro", "--num-codes", "0", "--num-bins",
            "0", "--patch-image-size", "32", "--criterion", "mue_scst", "--scst-samples", "2",
            "--scst-max-len-b", "4", *criterion_args]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    return task, cfg, task.build_criterion(cfg.criterion)


def test_scst_with_a_store_gives_the_same_references_and_rewards(data, tmp_path, one_thread):
    path = tmp_path / "train_refs.sqlite"
    task, cfg, plain = setup(data)
    _, _, stored = setup(data, "--scst-refs", str(path))
    assert plain.refs_path is None and stored.refs_path == str(path)
    ds = task.dataset("train")
    sample = ds.collater([ds[i] for i in range(0, len(ds), 3)])  # rows of several images, some repeated
    refs = plain.references(sample)
    assert not path.exists()
    assert stored.references(sample) == refs and path.is_file()  # built at the first use
    assert stored.scorer.df == plain.scorer.df and stored.scorer.num_docs == plain.scorer.num_docs == 8

    model = task.build_model(cfg.model).eval()  # eval: a training-mode call would move BatchNorm's statistics
    results = []
    for criterion in (plain, stored):
        torch.manual_seed(0)  # the same sampled captions
        with torch.no_grad():
            loss, _, log = criterion(model, sample)
        results.append((loss.item(), log["reward"], log["baseline"]))
    assert results[0][1] > 0
    assert results[0] == pytest.approx(results[1])


def test_scst_reads_an_existing_store_only(data, tmp_path, monkeypatch):
    path = tmp_path / "train_refs.sqlite"
    rs.main(["build-refs", str(data / "train.tsv"), "--out", str(path)])
    task, _, plain = setup(data)
    ds = task.dataset("train")
    sample = ds.collater([ds[0], ds[len(ds) - 1]])
    refs, df = plain.references(sample), plain.scorer.df

    def read_all(*args, **kwargs):
        raise AssertionError("every training row was read")

    monkeypatch.setattr(CaptionDataset, "references_by_image", read_all)
    monkeypatch.setattr(CaptionDataset, "reference_rows", read_all)
    _, _, stored = setup(data, "--scst-refs", str(path))
    assert stored.references(sample) == refs and stored.scorer.df == df  # df from iterating the store

    _, _, unwritable = setup(data, "--scst-refs", str(tmp_path / "train_refs.sqlite" / "x.sqlite"))
    with pytest.raises(DataError, match=r"x\.sqlite: cannot write the reference store"):
        unwritable.references(sample)
