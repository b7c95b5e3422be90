"""A file of every training image's references, built once and read per batch (self-critical training).

``mue_scst`` scores sampled captions against all references of a training row's image. Collecting them
(``CaptionDataset.references_by_image``) reads every row of the training file: fine for the synthetic
set, slow at the first step of every COCO run (113k images, 566k rows of base64 images). A reference
store holds the result in an SQLite file, written once, from which a batch's images are looked up with
one indexed query; the file is never read whole, except by ``iter_all`` (CIDEr-D document frequencies).

Layout: table ``refs(image_id TEXT PRIMARY KEY, refs TEXT)``, ``refs`` a JSON list of the image's
normalised references (rows of one image merged by ``merge_references``, as ``references_by_image``
does), rows in the order images first appear; table ``meta(key, value)`` with the
format name and version, the counts, and the source file's real path, size and mtime (ns). A store whose
source file has changed since is stale: ``open_reference_store`` rebuilds it with a warning. Files are
written to a temporary name and renamed into place, so a reader never sees half a store.

    python -m mue.data.reference_store build-refs DATA/train.tsv [--out FILE] [--selected-cols COLS]

writes FILE (default ``DATA/train.tsv.refs.sqlite``); ``fairseq-train ... --scst-refs FILE`` uses it,
or builds it at the first step when it does not exist yet.
"""
import argparse
import json
import logging
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from mue.data.datasets import merge_references
from mue.data.readers import DataError

logger = logging.getLogger(__name__)

FORMAT = "mue-reference-store"
VERSION = 1
#: ids per query: SQLite before 3.32 allows at most 999 bound parameters
MAX_IDS_PER_QUERY = 900


def source_signature(path: str) -> Tuple[str, int, int]:
    """(real path, size, mtime in ns) of a data file: what a store records to notice later changes."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the references' source file ({e.strerror})") from None
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def build_reference_store(dataset_or_rows, path: str, source: Optional[str] = None) -> "ReferenceStore":
    """Write the store of ``dataset_or_rows`` to ``path`` (atomically) and return it (opened lazily).

    ``dataset_or_rows``: a CaptionDataset (its reader's file is the recorded source unless ``source`` is
    given) or an iterable of (image id, normalised references) pairs. Without a source file the store
    records none and is never considered stale. An unwritable ``path`` is a DataError naming it, raised
    before any data is read."""
    is_dataset = hasattr(dataset_or_rows, "reference_rows")
    if is_dataset:
        source = source or getattr(getattr(dataset_or_rows, "reader", None), "path", None)
    signature = source_signature(source) if source else ("", -1, -1)  # before reading: a later edit is stale
    path = os.fspath(path)
    conn, tmp = _create(path)
    try:
        merged = merge_references(dataset_or_rows.reference_rows() if is_dataset else dataset_or_rows)
        meta = {"format": FORMAT, "version": str(VERSION), "images": str(len(merged)),
                "references": str(sum(len(refs) for refs in merged.values())), "source_path": signature[0],
                "source_size": str(signature[1]), "source_mtime_ns": str(signature[2])}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        conn.executemany("INSERT INTO refs VALUES (?, ?)",
                         ((str(image_id), json.dumps(refs)) for image_id, refs in merged.items()))
        conn.commit()
        conn.close()
        os.chmod(tmp, 0o644)  # mkstemp's file is private; a store is as readable as the data
        os.replace(tmp, path)  # parallel workers building the same store each rename a whole file
    except (OSError, sqlite3.Error) as e:
        raise _unwritable(path, e) from None
    finally:
        conn.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("reference store %s: %s images, %s references%s", path, meta["images"], meta["references"],
                f" from {source}" if source else "")
    return ReferenceStore(path)


def _create(path: str) -> Tuple[sqlite3.Connection, str]:
    """(connection, name) of an empty store at a temporary name unique to this call next to ``path``
    (its folder made if needed; workers of a distributed run may build the same store at once)."""
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp", dir=folder)
        os.close(fd)
        conn = sqlite3.connect(tmp)  # an empty file is an empty database
        conn.execute("PRAGMA journal_mode=OFF")  # a failed build leaves only the temporary file, removed
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("CREATE TABLE refs (image_id TEXT PRIMARY KEY, refs TEXT NOT NULL)")
        return conn, tmp
    except (OSError, sqlite3.Error) as e:
        if tmp and os.path.isfile(tmp):
            os.remove(tmp)
        raise _unwritable(path, e) from None


def _unwritable(path: str, error: Exception) -> DataError:
    return DataError(f"{path}: cannot write the reference store ({error}); give a path in a writable folder")


class ReferenceStore:
    """Read access to a store file (see the module docstring); the file is opened at first use, once per
    process, read-only. A missing, corrupt or foreign file is a DataError naming it at that point."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._conn: Optional[sqlite3.Connection] = None
        self._pid: Optional[int] = None
        self.meta: Dict[str, str] = {}

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a forked process opens its own connection
            if not os.path.isfile(self.path):
                raise DataError(f"{self.path}: no reference store file there")
            uri = Path(os.path.abspath(self.path)).as_uri() + "?mode=ro"
            try:
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
                meta = dict(conn.execute("SELECT key, value FROM meta"))
                conn.execute("SELECT image_id, refs FROM refs LIMIT 0")
            except sqlite3.DatabaseError as e:
                raise DataError(f"{self.path}: not a mue reference store ({e}); delete it to rebuild it") from None
            if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
                conn.close()
                raise DataError(f"{self.path}: not a {FORMAT} version {VERSION} file (format "
                                f"{meta.get('format')!r}, version {meta.get('version')!r}); delete it to rebuild it")
            self._conn, self._pid, self.meta = conn, os.getpid(), meta
        return self._conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = self._pid = None

    def __getstate__(self):
        return {"path": self.path, "_conn": None, "_pid": None, "meta": {}}

    def __len__(self) -> int:
        """The number of images."""
        self._db()
        return int(self.meta["images"])

    @property
    def num_references(self) -> int:
        self._db()
        return int(self.meta["references"])

    def refs(self, image_ids: Sequence) -> List[List[str]]:
        """The references of each image id (one query for a batch of up to MAX_IDS_PER_QUERY images).
        An id the store lacks is a DataError: the store is not the one of this training data."""
        ids = [str(i) for i in image_ids]
        unique = list(dict.fromkeys(ids))
        found: Dict[str, List[str]] = {}
        db = self._db()
        for start in range(0, len(unique), MAX_IDS_PER_QUERY):
            chunk = unique[start:start + MAX_IDS_PER_QUERY]
            query = f"SELECT image_id, refs FROM refs WHERE image_id IN ({','.join('?' * len(chunk))})"
            found.update((image_id, json.loads(refs)) for image_id, refs in db.execute(query, chunk))
        missing = [i for i in unique if i not in found]
        if missing:
            raise DataError(f"{self.path}: no references for image id(s) {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}: the store was built from other data "
                            f"({self.meta.get('source_path') or 'unknown source'}); delete it to rebuild it")
        return [found[i] for i in ids]

    def iter_all(self) -> Iterator[List[str]]:
        """Every image's references, one list per image in store order, streamed from the file."""
        for (refs,) in self._db().execute("SELECT refs FROM refs ORDER BY rowid"):
            yield json.loads(refs)

    def stale_reason(self, source: str) -> Optional[str]:
        """Why this store does not belong to the data file ``source`` as it is now, or None if it does
        (or records no source)."""
        self._db()
        if not self.meta.get("source_path"):
            return None
        recorded = (self.meta["source_path"], int(self.meta["source_size"]), int(self.meta["source_mtime_ns"]))
        now = source_signature(source)
        if recorded[0] != now[0]:
            return f"it was built from {recorded[0]}, not {now[0]}"
        if recorded[1:] != now[1:]:
            return (f"{now[0]} changed since it was built (size {recorded[1]} -> {now[1]} bytes, "
                    f"mtime {recorded[2]} -> {now[2]} ns)")
        return None


def open_reference_store(path: str, dataset) -> ReferenceStore:
    """The store at ``path`` for ``dataset`` (a CaptionDataset): used as it is when its recorded source is
    the dataset's file unchanged, built when missing, rebuilt with a warning when stale."""
    source = dataset.reader.path
    if os.path.exists(path):
        store = ReferenceStore(path)
        reason = store.stale_reason(source)
        if reason is None:
            return store
        store.close()
        logger.warning("reference store %s is stale: %s; rebuilding it", path, reason)
    else:
        logger.info("reference store %s not found: building it from %s (once)", path, source)
    return build_reference_store(dataset, path, source)


def reader_dataset(tsv: str, selected_cols: Optional[str] = None):
    """A CaptionDataset over an OFA caption TSV, only to read its references: the references need no
    dictionary or tokenizer, and this way they are read exactly as training reads them."""
    from mue.data.datasets import CaptionDataset
    from mue.data.readers import OfaCaptionTsv

    return CaptionDataset("train", OfaCaptionTsv(tsv, selected_cols=selected_cols), None, None, is_train=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mue.data.reference_store",
        description="Reference stores for self-critical training (criterion mue_scst, --scst-refs).")
    commands = p.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-refs", help="write the reference store of a training caption TSV")
    build.add_argument("tsv", help="OFA caption TSV (e.g. DATA/train.tsv)")
    build.add_argument("--out", help="store file (default: next to the data, TSV.refs.sqlite)")
    build.add_argument("--selected-cols", help="the TSV's columns, as the task's --selected-cols (default 0,4,2,1)")
    args = p.parse_args(argv)
    out = args.out or f"{args.tsv}.refs.sqlite"
    store = build_reference_store(reader_dataset(args.tsv, args.selected_cols), out)
    print(f"{out}: {len(store)} images, {store.num_references} references from {args.tsv}")


if __name__ == "__main__":
    main()
