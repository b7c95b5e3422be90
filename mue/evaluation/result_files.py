"""Result files in the formats OFA's and COCO's own evaluation tools read.

``fairseq-generate --eval-results FILE`` writes mue's record (mue.evaluation.records); these are the
companions a user of OFA or pycocotools expects:

  * captioning, ``--coco-results FILE``: the COCO caption results list ``[{"image_id", "caption"}, ...]``
    that ``pycocotools.coco.COCO.loadRes`` and OFA's caption evaluation read. Image ids that are numeric
    strings (COCO's, Karpathy's ``cocoid``) are written as integers, because COCO annotation files key
    images by integers and ``loadRes`` refuses results whose ids are not in the annotation file;
  * SNLI-VE, ``--snli-results FILE``: ``{"split", "accuracy", "n_examples", "predictions": [{"uniq_id",
    "answer"}, ...]}``: ``predictions`` is the list OFA's evaluation writes (``answer``: the predicted
    answer, "yes" / "no" / "maybe"), ``accuracy`` a fraction as in the record's metrics.

``load_coco_references`` reads a COCO caption annotation file (``images`` + ``annotations``, as OFA's
``*_coco_format.json`` and the synthetic generator's ``*_refs.json``) into {image id: [captions]}.
Files are written through a temporary file and renamed, so no half-written file is left behind.
"""
import json
import os
from typing import Dict, Hashable, List, Sequence

__all__ = ["coco_image_id", "coco_results", "write_coco_results", "snli_ve_predictions",
           "write_snli_ve_predictions", "is_coco_annotations", "load_coco_references", "write_json"]


def coco_image_id(image_id: Hashable):
    """COCO's id type: a numeric string (or an int) becomes an int, any other id is kept as a string."""
    if isinstance(image_id, bool):
        raise ValueError(f"image id {image_id!r} is not an id")
    if isinstance(image_id, int):
        return image_id
    text = str(image_id)
    return int(text) if text.isascii() and text.isdigit() else text


def coco_results(predictions: Sequence[dict]) -> List[dict]:
    """``[{"image_id", "caption"}]`` from the caption predictions of a record (rows with ``image_id``,
    else ``uniq_id``, and ``caption``); one caption per image, as ``loadRes`` needs (a second caption for
    an image is an error naming it)."""
    out, seen = [], {}
    for row in predictions:
        raw = row.get("image_id", row.get("uniq_id"))
        if raw is None or "caption" not in row:
            raise ValueError(f"COCO results: a prediction needs 'image_id' (or 'uniq_id') and 'caption', got {row!r}")
        image_id = coco_image_id(raw)
        if image_id in seen:
            raise ValueError(f"COCO results: image {image_id!r} has two captions ({seen[image_id]!r} and "
                             f"{row['caption']!r}); COCO's evaluation scores one caption per image")
        seen[image_id] = row["caption"]
        out.append({"image_id": image_id, "caption": row["caption"]})
    return out


def snli_ve_predictions(rows: Sequence[dict], accuracy: float, split: str) -> dict:
    """The SNLI-VE predictions file (module doc) from the record's rows ``{uniq_id, prediction, answer}``
    (there ``answer`` is the gold label; here, as in OFA's file, it is the predicted answer)."""
    return {"split": split, "accuracy": accuracy, "n_examples": len(rows),
            "predictions": [{"uniq_id": r["uniq_id"], "answer": r["prediction"]} for r in rows]}


def write_json(path: str, payload, what: str) -> None:
    """Write ``payload`` to ``path`` atomically (its folder is created, as for --eval-results); ``what``
    names the option in errors."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{what} {path}: cannot write it: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_coco_results(path: str, predictions: Sequence[dict]) -> List[dict]:
    """Write the COCO results list of ``predictions`` to ``path`` (``--coco-results``); returns it."""
    results = coco_results(predictions)
    write_json(path, results, "--coco-results")
    return results


def write_snli_ve_predictions(path: str, rows: Sequence[dict], accuracy: float, split: str) -> dict:
    """Write the SNLI-VE predictions file to ``path`` (``--snli-results``); returns it."""
    payload = snli_ve_predictions(rows, accuracy, split)
    write_json(path, payload, "--snli-results")
    return payload


def is_coco_annotations(data) -> bool:
    """True for a COCO annotation file's content (a json object with 'images' and 'annotations')."""
    return isinstance(data, dict) and "annotations" in data and "images" in data


def load_coco_references(data, where: str = "COCO annotations") -> Dict[str, List[str]]:
    """{str(image id): [captions]} of a COCO caption annotation file's content, for every image listed
    under ``images``; ``where`` (the file name) is named in errors."""
    if not is_coco_annotations(data):
        raise ValueError(f"{where}: not a COCO annotation file (a json object with 'images' and 'annotations')")
    refs: Dict[str, List[str]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise ValueError(f"{where}: images[{i}] has no 'id'")
        refs[str(img["id"])] = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{where}: annotations[{i}] needs 'image_id' and a 'caption' string")
        key = str(ann["image_id"])
        if key not in refs:
            raise ValueError(f"{where}: annotations[{i}] refers to image {ann['image_id']!r}, which 'images' "
                             "does not list")
        refs[key].append(ann["caption"])
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise ValueError(f"{where}: {len(empty)} images have no caption (e.g. {empty[:5]})")
    return refs
