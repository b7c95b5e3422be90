"""Batch examples of the vision-language datasets into the sample dict of CONTRACT.md "A batch".

An example (one dataset item) is a dict:
  "id" int, "source" LongTensor[S] (bos ... eos), "target" LongTensor[T] (tokens + eos),
  "prev_output_tokens" LongTensor[T] (bos + tokens), "patch_image" FloatTensor[3, H, W], "patch_mask" bool,
  and optionally "constraint_mask" BoolTensor[T, V], "answer" str, "label" int, "refs" list[str],
  "uniq_id" str, "image_id" str, "difficulty" int, "split" str.
Token tensors are right-padded with ``pad``. Constraint masks are padded with True (no constraint), so a
masked log-softmax stays finite at padded positions (the loss ignores them anyway).
"""
from typing import List, Optional

import torch


def pad_right(tensors: List[torch.Tensor], pad: int) -> torch.Tensor:
    """Stack 1-d tensors of different lengths into [B, max_len], right-padded with ``pad``."""
    size = max(t.numel() for t in tensors)
    out = tensors[0].new_full((len(tensors), size), pad)
    for i, t in enumerate(tensors):
        out[i, : t.numel()] = t
    return out


def pad_constraint_masks(masks: List[torch.Tensor], length: int) -> torch.Tensor:
    """Stack BoolTensor[T_i, V] masks into [B, length, V]; rows past T_i allow every token."""
    vocab = masks[0].size(1)
    out = torch.ones(len(masks), length, vocab, dtype=torch.bool)
    for i, m in enumerate(masks):
        if m.size(1) != vocab:
            raise ValueError(f"constraint masks disagree on the vocabulary size: {m.size(1)} vs {vocab}")
        out[i, : m.size(0)] = m
    return out


def collate(samples: List[dict], pad: int) -> dict:
    """Batch ``samples`` (see the module docstring); an empty list gives {} (fairseq's convention)."""
    if not samples:
        return {}
    for s in samples:
        for key in ("source", "target", "prev_output_tokens"):
            if s[key].dim() != 1 or s[key].numel() == 0:
                raise ValueError(f"example id {s['id']}: {key!r} must be a non-empty 1-d tensor")
        if s["target"].numel() != s["prev_output_tokens"].numel():
            raise ValueError(f"example id {s['id']}: target and prev_output_tokens differ in length")

    src_tokens = pad_right([s["source"] for s in samples], pad)
    target = pad_right([s["target"] for s in samples], pad)
    batch = {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "nsentences": len(samples),
        "ntokens": int(target.ne(pad).sum().item()),
        "net_input": {
            "src_tokens": src_tokens,
            "src_lengths": torch.tensor([s["source"].numel() for s in samples], dtype=torch.long),
            "patch_images": torch.stack([s["patch_image"] for s in samples]),
            "patch_masks": torch.tensor([bool(s["patch_mask"]) for s in samples], dtype=torch.bool),
            "prev_output_tokens": pad_right([s["prev_output_tokens"] for s in samples], pad),
        },
        "target": target,
    }
    first = samples[0]
    if "constraint_mask" in first:
        batch["constraint_masks"] = (
            pad_constraint_masks([s["constraint_mask"] for s in samples], target.size(1))
            if _all_or_none(samples, "constraint_mask") else None)
    if "answer" in first:
        batch["answers"] = [s["answer"] for s in samples]
    if "label" in first:
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if "refs" in first:
        batch["refs"] = [list(s["refs"]) for s in samples]
    if "uniq_id" in first:
        batch["uniq_ids"] = [s["uniq_id"] for s in samples]
    if "image_id" in first:
        batch["image_ids"] = [s["image_id"] for s in samples]
        # the encoder runs one image stream per image id at inference (mue.models.image_reuse)
        batch["net_input"]["image_keys"] = batch["image_ids"]
    if "difficulty" in first:
        batch["difficulty"] = torch.tensor([int(s["difficulty"]) for s in samples], dtype=torch.long)
    if "split" in first:
        batch["split"] = first["split"]
    return batch


def _all_or_none(samples: List[dict], key: str) -> Optional[bool]:
    """True when every example has ``key`` (not None); None when none has it; error when mixed."""
    present = [s.get(key) is not None for s in samples]
    if all(present):
        return True
    if not any(present):
        return None
    raise ValueError(f"batch mixes examples with and without {key!r}")
