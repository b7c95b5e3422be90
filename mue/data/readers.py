"""Random-access readers of raw vision-language data; each returns plain records (dicts).

Formats read:
  * OFA's caption TSV and SNLI-VE TSV (base64 images inline): ``OfaCaptionTsv``, ``OfaSnliVeTsv``,
    on top of ``TsvReader`` (a byte-offset index, so a 500k-row file is never loaded whole);
  * COCO captions as Karpathy's ``dataset_coco.json`` or a COCO annotation json, plus an image folder:
    ``CocoCaptionJson``;
  * SNLI-VE jsonl plus the Flickr30k image folder: ``SnliVeJsonl``.

Records (ids are strings; text is raw: lower-casing/punctuation/truncation is the dataset's job):
  caption: {"uniq_id", "image_id", "image", "captions": list[str], "difficulty": int, "source": str}
  SNLI-VE: {"uniq_id", "image_id", "image", "hypothesis", "premise", "label", "difficulty", "source"}
``image`` is a PIL RGB image decoded when the record is read; ``difficulty`` is -1 unless the data gives
it; ``source`` says where the record came from ("file:line" or "file: image id ...") for later messages.

Bad input raises ``DataError`` naming the file and the line (or image id). With ``skip_bad=True`` bad
entries are left out instead, each counted in ``reader.skipped`` as ``(line or image id, reason)`` and
reported in one logged warning. Everything that can be checked without decoding an image (column count,
label, empty text, a missing image file, malformed json) is checked while indexing, so ``len()`` is exact.
An undecodable image is only found when its record is read: without ``skip_bad`` that raises
``DataError``; with ``skip_bad`` the record comes back with ``image=None`` (the collater marks such a row
``patch_masks=False``), the entry is added to ``skipped`` and a warning is logged.
``verify_images=True`` decodes every image while indexing instead, so such rows are also skipped (or
raised) up front, at the cost of decoding every image once. An image Pillow refuses as a decompression bomb
(more than twice ``PIL.Image.MAX_IMAGE_PIXELS``, Pillow's default limit, which is kept) is such an
undecodable image; its DataError gives its size and says to resize it.
"""
import base64
import binascii
import io
import json
import logging
import operator
import os
import threading
from array import array
from collections import OrderedDict
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

from PIL import Image, UnidentifiedImageError

from mue.errors import UserError

logger = logging.getLogger(__name__)

SNLI_VE_LABELS = ("contradiction", "entailment", "neutral")
Cols = Union[None, str, Sequence[int]]


class DataError(UserError, ValueError):
    """Malformed input data; the message names the file and the line or image id."""


def parse_cols(cols: Cols) -> Optional[List[int]]:
    """Parse OFA-style ``selected_cols`` ("0,4,2" or a sequence of ints) into a list of ints."""
    if cols is None:
        return None
    if isinstance(cols, str):
        try:
            return [int(c) for c in cols.split(",") if c.strip() != ""]
        except ValueError:
            raise DataError(f"selected_cols must be comma-separated integers, got {cols!r}") from None
    return [int(c) for c in cols]


def decode_base64_image(text: str, where: str) -> Image.Image:
    """Decode a base64 image (standard or url-safe alphabet, as OFA writes it) to a PIL RGB image."""
    failure = f"{where}: cannot decode the base64 image"
    try:
        raw = base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{failure}: {e}") from None
    return _open_rgb(io.BytesIO(raw), where, "the base64 image", failure)


def load_image_file(path: str, where: str) -> Image.Image:
    """Open an image file as PIL RGB."""
    return _open_rgb(path, where, f"image {path}", f"{where}: cannot read image {path}")


def _open_rgb(source, where: str, what: str, failure: str) -> Image.Image:
    """Decode ``source`` (a path or a binary file) to RGB; every failure is a DataError naming ``where``.

    Pillow's decompression-bomb guard is kept at its default (``Image.MAX_IMAGE_PIXELS``): above twice
    that many pixels Pillow refuses the image, which becomes a DataError (a bad row, skipped with
    skip_bad like any undecodable image); between once and twice Pillow only warns, and the image is
    decoded after a logged warning naming ``where`` (Pillow's own warning does not say which image).
    """
    try:
        with Image.open(source) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                logger.warning("%s: %s is %d x %d pixels, over Pillow's decompression-bomb warning limit "
                               "of %s pixels; decoding it anyway", where, what, img.width, img.height, f"{limit:,}")
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        size = _header_size(source)
        pixels = f"{size[0]} x {size[1]} pixels" if size else f"too large ({e})"
        raise DataError(
            f"{where}: {what} is {pixels}, over the {2 * Image.MAX_IMAGE_PIXELS:,} pixels that Pillow decodes "
            "(its decompression-bomb limit): resize the image (the model sees it at --patch-image-size "
            "anyway) or leave the row out (--skip-bad-rows)") from None
    except UnidentifiedImageError:  # Pillow's message names a BytesIO object or repeats the path
        raise DataError(f"{failure}: not an image in a format Pillow reads") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{failure}: {e}") from None


def _header_size(source) -> Optional[Tuple[int, int]]:
    """(width, height) from the header of an image that ``Image.open`` refuses as a decompression bomb.

    Each Pillow format plugin reads the header only (the size check is ``Image.open``'s, not theirs);
    the first that accepts the data gives the size. Only used to word the error; None if none reads it.
    """
    Image.init()
    fh = open(source, "rb") if isinstance(source, (str, bytes, os.PathLike)) else source
    try:
        fh.seek(0)
        prefix = fh.read(16)
        for factory, accept in list(Image.OPEN.values()):
            accepted = accept is None or accept(prefix)
            if not accepted or isinstance(accepted, str):  # a str is Pillow's "looks like X, but..." note
                continue
            fh.seek(0)
            try:
                return tuple(factory(fh).size)
            except Exception:  # noqa: BLE001 -- any plugin failure: try the next one
                continue
        return None
    finally:
        if fh is not source:
            fh.close()


class _Reader:
    """Shared bad-entry bookkeeping: raise, or skip and count (see the module docstring)."""

    def __init__(self, path: str, skip_bad: bool):
        self.path = str(path)
        self.skip_bad = skip_bad
        self.skipped: List[tuple] = []

    def _bad(self, where, reason: str, message: str):
        if not self.skip_bad:
            raise DataError(message)
        self.skipped.append((where, reason))

    def _report_skipped(self):
        if self.skipped:
            where, reason = self.skipped[0]
            logger.warning(
                "%s: skipped %d bad entries (skip_bad=True); first at %s: %s",
                self.path, len(self.skipped), where, reason,
            )

    def _read_image(self, loader: Callable[[], Image.Image], where, source: str):
        """Decode one image; with skip_bad a failure gives None (counted and logged)."""
        try:
            return loader()
        except DataError as e:
            if not self.skip_bad:
                raise
            if not any(w == where for w, _ in self.skipped):
                self.skipped.append((where, str(e)))
            logger.warning("%s: image skipped (skip_bad=True), record has image=None", e)
            return None

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TsvReader(_Reader):
    """Random access to the rows of a (large) TSV file through a byte-offset index built in one pass.

    ``num_cols``: the column count every row must have (an int or a collection of allowed ints; the first
    good row then fixes which one). ``None``: the first row's count. ``check_row(fields) -> reason | None``
    is an extra per-row check run while indexing (on all columns). Blank lines carry no data and are
    ignored. ``row(i)`` returns the ``selected_cols`` of row ``i`` (all columns when None) as strings.
    The index lives in memory only; file handles are reopened per process (safe with DataLoader workers).
    """

    def __init__(
        self,
        path: str,
        selected_cols: Cols = None,
        separator: str = "\t",
        num_cols: Union[None, int, Iterable[int]] = None,
        skip_bad: bool = False,
        check_row: Optional[Callable[[List[str]], Optional[str]]] = None,
        key: Optional[Callable[[List[str]], str]] = None,
    ):
        super().__init__(path, skip_bad)
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: file not found")
        self.selected_cols = parse_cols(selected_cols)
        self.separator = separator
        self._allowed = None if num_cols is None else (
            {num_cols} if isinstance(num_cols, int) else set(num_cols))
        self.num_cols: Optional[int] = None  # fixed by the first good row
        self._check_row = check_row
        self._key = key
        self.keys: List[str] = []  # key(fields) of every good row, read while indexing (when `key` is given)
        self._offsets = array("q")
        self._lines = array("q")
        self._fh = None
        self._fh_pid = None
        self._build_index()

    def _split(self, raw: bytes, line_no: int) -> List[str]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}:{line_no}: not valid UTF-8 ({e})") from None
        return text.rstrip("\r\n").split(self.separator)

    def _row_problem(self, fields: List[str]) -> Optional[str]:
        got = len(fields)
        if self.num_cols is not None:
            if got != self.num_cols:
                return f"expected {self.num_cols} columns, got {got}"
        elif self._allowed is not None and got not in self._allowed:
            want = " or ".join(str(n) for n in sorted(self._allowed))
            return f"expected {want} columns, got {got}"
        if self.selected_cols and max(self.selected_cols) >= got:
            return f"selected column {max(self.selected_cols)} does not exist: the row has {got} columns"
        if self._check_row is not None:
            return self._check_row(fields)
        return None

    def _build_index(self):
        pos = 0
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                start, pos = pos, pos + len(raw)
                if not raw.strip():
                    continue
                try:
                    fields = self._split(raw, line_no)
                    problem = self._row_problem(fields)
                except DataError as e:
                    problem, fields = str(e), None
                if problem is not None:
                    self._bad(line_no, problem, f"{self.path}:{line_no}: {problem}")
                    continue
                if self.num_cols is None:
                    self.num_cols = len(fields)
                self._offsets.append(start)
                self._lines.append(line_no)
                if self._key is not None:
                    self.keys.append(self._key(fields))
        self._report_skipped()

    def __len__(self) -> int:
        return len(self._offsets)

    def line_number(self, i: int) -> int:
        """1-based line number of row ``i`` in the file."""
        return self._lines[i]

    def _handle(self):
        """(file handle, lock) of this process. fairseq prefetches batches in a thread even with
        --num-workers 0, and criteria may read rows meanwhile, so seek+readline is done under a lock."""
        if self._fh is None or self._fh_pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._fh_pid = os.getpid()
            self._fh_lock = threading.Lock()
        return self._fh, self._fh_lock

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = state["_fh_pid"] = state["_fh_lock"] = None
        return state

    def row(self, i: int) -> List[str]:
        """The selected columns of row ``i`` (0-based over the good rows)."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: row {i} out of range (0..{len(self) - 1})")
        fh, lock = self._handle()
        with lock:
            fh.seek(self._offsets[i])
            raw = fh.readline()
        line_no = self._lines[i]
        fields = self._split(raw, line_no)
        if len(fields) != self.num_cols:  # the file changed since it was indexed
            raise DataError(f"{self.path}:{line_no}: expected {self.num_cols} columns, got {len(fields)}")
        if self.selected_cols is None:
            return fields
        return [fields[c] for c in self.selected_cols]

    __getitem__ = row


def _parse_difficulty(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


class _OfaTsv(_Reader):
    """Common part of the two OFA TSV readers: column mapping, optional difficulty column, images.

    ``selected_cols`` lists, in the order of ``FIELDS``, the file column of each field (OFA's convention).
    ``image_id`` is the optional last field: when left out, ``image_id = uniq_id`` (as OFA's evaluation
    does). ``difficulty_col``: "auto" uses column ``LAYOUT_COLS`` (the first column after OFA's layout,
    written by ``mue.data.synthetic``) when the rows have exactly ``LAYOUT_COLS + 1`` columns and the
    default column selection is used; an int names the column; None means no difficulty (-1).
    """

    FIELDS: tuple = ()
    DEFAULT_COLS: tuple = ()
    LAYOUT_COLS = 0

    def __init__(self, path, selected_cols: Cols = None, skip_bad=False, verify_images=False,
                 difficulty_col: Union[str, int, None] = "auto"):
        super().__init__(path, skip_bad)
        cols = parse_cols(selected_cols) or list(self.DEFAULT_COLS)
        n_req = len(self.FIELDS) - 1
        if len(cols) not in (n_req, n_req + 1):
            raise DataError(
                f"{self.path}: selected_cols must give {n_req} or {n_req + 1} columns for "
                f"({', '.join(self.FIELDS)}), got {cols}")
        self.cols = dict(zip(self.FIELDS, cols))
        default_layout = cols == list(self.DEFAULT_COLS)
        if difficulty_col == "auto":
            self._difficulty_auto, self._difficulty_col = default_layout, None
        else:
            self._difficulty_auto, self._difficulty_col = False, difficulty_col
        num_cols = (self.LAYOUT_COLS, self.LAYOUT_COLS + 1) if default_layout else None
        self.verify_images = verify_images
        image_col = self.cols.get("image_id", self.cols["uniq_id"])
        self.tsv = TsvReader(path, None, "\t", num_cols, skip_bad, self._check, key=operator.itemgetter(image_col))
        self.skipped = self.tsv.skipped  # one list for index-time and read-time problems

    def difficulty_column(self, ncols: int) -> Optional[int]:
        if self._difficulty_auto:
            return self.LAYOUT_COLS if ncols == self.LAYOUT_COLS + 1 else None
        return self._difficulty_col

    def _check(self, fields: List[str]) -> Optional[str]:
        if max(self.cols.values()) >= len(fields):
            return f"selected column {max(self.cols.values())} does not exist: the row has {len(fields)} columns"
        dcol = self.difficulty_column(len(fields))
        if dcol is not None:
            if dcol >= len(fields):
                return f"difficulty column {dcol} does not exist: the row has {len(fields)} columns"
            if _parse_difficulty(fields[dcol]) is None:
                return f"difficulty must be an integer, got {fields[dcol]!r}"
        if not fields[self.cols["uniq_id"]].strip():
            return "empty uniq-id"
        if not fields[self.cols["image"]].strip():
            return "empty image column"
        problem = self._check_text(fields)
        if problem is None and self.verify_images:
            try:
                decode_base64_image(fields[self.cols["image"]], "")
            except DataError as e:
                problem = str(e).lstrip(": ")
        return problem

    def _check_text(self, fields: List[str]) -> Optional[str]:
        raise NotImplementedError

    def _common(self, i: int):
        fields = self.tsv.row(i)
        line = self.tsv.line_number(i)
        where = f"{self.path}:{line}"
        dcol = self.difficulty_column(len(fields))
        uniq_id = fields[self.cols["uniq_id"]]
        image_col = fields[self.cols["image"]]
        record = {
            "uniq_id": uniq_id,
            "image_id": fields[self.cols["image_id"]] if "image_id" in self.cols else uniq_id,
            "image": self._read_image(lambda: decode_base64_image(image_col, where), line, where),
            "difficulty": -1 if dcol is None else int(fields[dcol]),
            "source": where,
        }
        return fields, record

    def __len__(self):
        return len(self.tsv)

    def image_id(self, i: int) -> str:
        """Row ``i``'s image id, without reading the row (kept from indexing)."""
        return self.tsv.keys[i]


class OfaCaptionTsv(_OfaTsv):
    """OFA caption TSV: uniq-id, image-id, caption, object labels (unused), base64 image.

    Default ``selected_cols`` "0,4,2,1" = (uniq_id, image, caption, image_id); OFA's own "0,4,2" works too
    (then image_id = uniq_id). Training files hold one caption per line; valid/test files join the
    references with ``&&``: ``captions`` is that split. An optional 6th column holds the difficulty.
    """

    FIELDS = ("uniq_id", "image", "caption", "image_id")
    DEFAULT_COLS = (0, 4, 2, 1)
    LAYOUT_COLS = 5

    def _check_text(self, fields):
        caps = fields[self.cols["caption"]].split("&&")
        if any(not c.strip() for c in caps):
            return "empty caption" if len(caps) == 1 else "empty caption among the '&&' references"
        return None

    def __getitem__(self, i):
        fields, record = self._common(i)
        record["captions"] = [c.strip() for c in fields[self.cols["caption"]].split("&&")]
        return record


class OfaSnliVeTsv(_OfaTsv):
    """OFA SNLI-VE TSV: uniq-id, image-id, base64 image, hypothesis, premise (caption), label.

    Default ``selected_cols`` "0,2,3,4,5,1" = (uniq_id, image, hypothesis, premise, label, image_id);
    OFA's own "0,2,3,4,5" works too. Labels must be contradiction/entailment/neutral; the hypothesis must
    not be empty (the premise may be: OFA's default prompt does not use it). Optional 7th column:
    difficulty.
    """

    FIELDS = ("uniq_id", "image", "hypothesis", "premise", "label", "image_id")
    DEFAULT_COLS = (0, 2, 3, 4, 5, 1)
    LAYOUT_COLS = 6

    def _check_text(self, fields):
        label = fields[self.cols["label"]].strip()
        if label not in SNLI_VE_LABELS:
            return f"unknown label {label!r} (expected one of {', '.join(SNLI_VE_LABELS)})"
        if not fields[self.cols["hypothesis"]].strip():
            return "empty hypothesis"
        return None

    def text_fields(self, i: int) -> Tuple[str, str, str]:
        """Row ``i``'s (uniq_id, hypothesis, label), without decoding its image."""
        fields = self.tsv.row(i)
        problem = self._check_text(fields)
        if problem:
            raise DataError(f"{self.path}:{self.tsv.line_number(i)}: {problem}")
        return (fields[self.cols["uniq_id"]], fields[self.cols["hypothesis"]].strip(),
                fields[self.cols["label"]].strip())

    def __getitem__(self, i):
        fields, record = self._common(i)
        record["hypothesis"] = fields[self.cols["hypothesis"]].strip()
        record["premise"] = fields[self.cols["premise"]].strip()
        record["label"] = fields[self.cols["label"]].strip()
        return record


class _ImageFolderReader(_Reader):
    """Shared part of the json readers: a list of index entries with image paths on disk."""

    def __init__(self, path, image_dir, skip_bad, verify_images):
        super().__init__(path, skip_bad)
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: file not found")
        self.image_dir = str(image_dir)
        self.verify_images = verify_images
        self.entries: List[dict] = []

    def _add(self, entry: dict, where, where_text: str):
        """Keep ``entry`` if its image file exists (and decodes, with verify_images)."""
        path = entry["image_path"]
        if not os.path.isfile(path):
            return self._bad(where, f"image file not found: {path}", f"{where_text}: image file not found: {path}")
        if self.verify_images:
            try:
                load_image_file(path, where_text)
            except DataError as e:
                return self._bad(where, str(e), str(e))
        entry["source"] = where_text
        self.entries.append(entry)

    def __len__(self):
        return len(self.entries)

    def image_id(self, i: int) -> str:
        return str(self.entries[i]["image_id"])

    def _image(self, entry):
        return self._read_image(lambda: load_image_file(entry["image_path"], entry["source"]),
                                entry["where"], entry["source"])


class CocoCaptionJson(_ImageFolderReader):
    """COCO captions from Karpathy's ``dataset_coco.json`` or a COCO annotation json, plus an image folder.

    Karpathy format: ``images[]`` with ``filepath`` (optional), ``filename``, ``split``, ``sentences[].raw``
    and ``cocoid``/``imgid``; ``split`` (train/val/test/restval) is required, and 'train' takes the
    'restval' images too only with ``include_restval=True``. COCO format (``images`` with ``id`` and
    ``file_name``, ``annotations`` with ``image_id`` and ``caption``): the file is one split already, so
    ``split`` only labels it. Images are read from ``image_dir/filepath/filename`` (Karpathy) or
    ``image_dir/file_name`` (COCO). One record per image with all its captions, or with
    ``per_caption=True`` one record per caption (as OFA's training TSV). Bad entries are named by image id.
    """

    def __init__(self, json_path, image_dir, split: Optional[str] = None, include_restval: bool = False,
                 per_caption: bool = False, skip_bad: bool = False, verify_images: bool = False):
        super().__init__(json_path, image_dir, skip_bad, verify_images)
        self.split = split
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path}: not valid json: {e}") from None
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DataError(f"{self.path}: expected a json object with an 'images' list")
        if "annotations" in data:
            items = self._coco_items(data)
        elif all(isinstance(im, dict) and "sentences" in im for im in images):
            items = self._karpathy_items(images, split, include_restval)
        else:
            raise DataError(f"{self.path}: neither Karpathy format (images[].sentences) nor COCO format "
                            "(images + annotations)")
        for image_id, path, captions, difficulty in items:
            where_text = f"{self.path}: image id {image_id}"
            if not captions:
                self._bad(image_id, "no captions", f"{where_text}: no captions")
                continue
            empty = [k for k, c in enumerate(captions) if not str(c).strip()]
            if empty:
                self._bad(image_id, f"empty caption #{empty[0]}", f"{where_text}: empty caption #{empty[0]}")
                continue
            captions = [str(c).strip() for c in captions]
            groups = [[c] for c in captions] if per_caption else [captions]
            for k, caps in enumerate(groups):
                uniq_id = f"{image_id}_{k}" if per_caption else image_id
                n_before = len(self.entries)
                self._add({"uniq_id": uniq_id, "image_id": image_id, "image_path": path,
                           "captions": caps, "difficulty": difficulty, "where": image_id},
                          image_id, where_text)
                if len(self.entries) == n_before:  # bad image: one report per image is enough
                    break
        self._report_skipped()

    def _karpathy_items(self, images, split, include_restval):
        if split is None:
            raise DataError(f"{self.path}: Karpathy format needs split= (train, val, test or restval)")
        wanted = {split} | ({"restval"} if split == "train" and include_restval else set())
        for k, im in enumerate(images):
            if im.get("split") not in wanted:
                continue
            image_id = str(im.get("cocoid", im.get("imgid", k)))
            if "filename" not in im:
                self._bad(image_id, "no 'filename'", f"{self.path}: image id {image_id}: no 'filename'")
                continue
            path = os.path.join(self.image_dir, im.get("filepath", ""), im["filename"])
            caps = [s.get("raw", "") if isinstance(s, dict) else "" for s in im["sentences"]]
            yield image_id, path, caps, int(im.get("difficulty", -1))

    def _coco_items(self, data):
        images = OrderedDict()
        for k, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                self._bad(f"images[{k}]", "needs 'id' and 'file_name'",
                          f"{self.path}: images[{k}] needs 'id' and 'file_name'")
                continue
            images[str(im["id"])] = (im["file_name"], int(im.get("difficulty", -1)), [])
        for k, ann in enumerate(data["annotations"]):
            image_id = str(ann.get("image_id")) if isinstance(ann, dict) else None
            if image_id not in images or "caption" not in ann:
                self._bad(f"annotations[{k}]", "unknown image_id or no caption",
                          f"{self.path}: annotations[{k}]: unknown image_id {image_id} or no 'caption'")
                continue
            images[image_id][2].append(ann["caption"])
        for image_id, (file_name, difficulty, caps) in images.items():
            yield image_id, os.path.join(self.image_dir, file_name), caps, difficulty

    def __getitem__(self, i):
        e = self.entries[i]
        return {"uniq_id": e["uniq_id"], "image_id": e["image_id"], "image": self._image(e),
                "captions": list(e["captions"]), "difficulty": e["difficulty"], "source": e["source"]}


class SnliVeJsonl(_ImageFolderReader):
    """SNLI-VE jsonl (``snli_ve_{train,dev,test}.jsonl``) plus the Flickr30k image folder.

    Keys: ``gold_label``, ``sentence2`` (hypothesis), ``sentence1`` (premise), ``pairID`` (uniq_id) and the
    Flickr30k id under ``Flickr30K_ID``, ``Flickr30kID`` or ``Flikr30kID``; the image is
    ``image_dir/<id>.jpg``. An optional integer ``difficulty`` key is honoured. Errors name file and line.
    """

    ID_KEYS = ("Flickr30K_ID", "Flickr30kID", "Flikr30kID")

    def __init__(self, jsonl_path, image_dir, skip_bad: bool = False, verify_images: bool = False):
        super().__init__(jsonl_path, image_dir, skip_bad, verify_images)
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where_text = f"{self.path}:{line_no}"
                entry, problem = self._parse(raw)
                if problem is not None:
                    self._bad(line_no, problem, f"{where_text}: {problem}")
                    continue
                entry["where"] = line_no
                self._add(entry, line_no, where_text)
        self._report_skipped()

    def _parse(self, raw: bytes):
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, f"not valid json: {e}"
        if not isinstance(obj, dict):
            return None, "expected a json object"
        image_id = next((str(obj[k]) for k in self.ID_KEYS if k in obj), None)
        if image_id is None:
            return None, f"no image id (looked for {', '.join(self.ID_KEYS)})"
        missing = [k for k in ("gold_label", "sentence1", "sentence2", "pairID") if k not in obj]
        if missing:
            return None, f"missing key(s) {', '.join(missing)}"
        label = str(obj["gold_label"]).strip()
        if label not in SNLI_VE_LABELS:
            return None, f"unknown label {label!r} (expected one of {', '.join(SNLI_VE_LABELS)})"
        hypothesis = str(obj["sentence2"]).strip()
        if not hypothesis:
            return None, "empty hypothesis"
        difficulty = _parse_difficulty(str(obj.get("difficulty", -1)))
        if difficulty is None:
            return None, f"difficulty must be an integer, got {obj['difficulty']!r}"
        file_name = image_id if image_id.lower().endswith(".jpg") else image_id + ".jpg"
        return {"uniq_id": str(obj["pairID"]), "image_id": image_id.rsplit(".jpg", 1)[0],
                "image_path": os.path.join(self.image_dir, file_name), "hypothesis": hypothesis,
                "premise": str(obj["sentence1"]).strip(), "label": label, "difficulty": difficulty}, None

    def __getitem__(self, i):
        e = self.entries[i]
        return {"uniq_id": e["uniq_id"], "image_id": e["image_id"], "image": self._image(e),
                "hypothesis": e["hypothesis"], "premise": e["premise"], "label": e["label"],
                "difficulty": e["difficulty"], "source": e["source"]}
