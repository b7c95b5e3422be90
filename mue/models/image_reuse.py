"""Encode each image once: which rows of a batch share an image, and a bounded cache across batches.

The decomposed encoder's image stream (ResNet stem + image layers, with their own exits) does not depend
on the text, so rows that ask different questions about one image (SNLI-VE has ~18 hypotheses per image)
can share one run of it, exactly. `image_groups` finds those rows: by the image ids the batch carries,
else by identical pixels. `ImageStreamCache` keeps the image stream of recent images for later batches
(the Python API, long-running services); it is off unless asked for (`--image-cache-size`).
"""
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def image_groups(patch_images: Tensor, with_image: Tensor, keys: Optional[Sequence[str]] = None
                 ) -> Optional[Tuple[Tensor, Tensor]]:
    """``(first [U], inverse [B])``: the first row of each group of rows that share an image, and each
    row's group; None when no two rows share one. Rows without an image (``with_image`` False) are never
    grouped. ``keys``: the rows' image ids (the same id means the same image); without them, rows whose
    pixels are identical share a group."""
    bsz = patch_images.size(0)
    if bsz < 2:
        return None
    present = with_image.tolist()
    if keys is not None:
        if len(keys) != bsz:
            raise ValueError(f"image_groups: {len(keys)} image keys for {bsz} rows")
        codes = {}
        group = [codes.setdefault(str(k), len(codes)) if p else None for k, p in zip(keys, present)]
    else:
        group = _pixel_groups(patch_images, present)
    group = [g if g is not None else bsz + row for row, g in enumerate(group)]  # no image: a group of its own
    codes = torch.tensor(group, device=patch_images.device)
    _, inverse = torch.unique(codes, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    if n_groups == bsz:
        return None
    rows = torch.arange(bsz, device=patch_images.device)
    first = torch.full((n_groups,), bsz, dtype=torch.long, device=rows.device).scatter_reduce(
        0, inverse, rows, reduce="amin")
    return first, inverse


def _pixel_groups(patch_images: Tensor, present: Sequence[bool]):
    """Group ids of rows with identical pixels: a hash of each row's bits proposes the groups, an exact
    comparison confirms them (rows that only collide in the hash get groups of their own). The hash is
    integer arithmetic (wrapping int64 sums of the pixels' bit patterns times fixed random weights), so
    identical rows hash alike whatever order the device sums in."""
    flat = patch_images.flatten(1).contiguous()
    bits = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]).long()
    digest = (bits * _projection(flat.size(1), flat.device)).sum(1).tolist()
    first_of, group = {}, []
    for row, (value, here) in enumerate(zip(digest, present)):
        if not here:
            group.append(None)
            continue
        candidate = first_of.setdefault(value, row)
        if candidate != row and not torch.equal(flat[candidate], flat[row]):
            candidate = row  # a collision of the projection, not the same image
        group.append(candidate)
    return group


_PROJECTIONS = {}


def _projection(size: int, device) -> Tensor:
    key = (size, str(device))
    if key not in _PROJECTIONS:
        weights = torch.randint(1, 2 ** 62, (size,), generator=torch.Generator().manual_seed(0))
        _PROJECTIONS[key] = weights.to(device)
    return _PROJECTIONS[key]


class ImageStreamCache:
    """The image stream's output for recently seen images, least recently used first out.

    Entries are keyed by the image key (its id), the image's size, the image-stream exit settings and the
    encoder (its identity and a version number the owner bumps when weights change), so no setting or
    model change can hand back a stale result. ``max_images``: entries kept (0: none)."""

    def __init__(self, max_images: int):
        if isinstance(max_images, bool) or int(max_images) != max_images or max_images < 0:
            raise ValueError(f"ImageStreamCache: max_images must be an integer >= 0, got {max_images!r}")
        self.max_images = int(max_images)
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(image_key: str, image_hw: tuple, settings: tuple, encoder) -> tuple:
        return (str(image_key), tuple(image_hw), settings, id(encoder), getattr(encoder, "weights_version", 0))

    def get(self, key: tuple):
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, value: tuple):
        if self.max_images == 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_images:
            self.entries.popitem(last=False)

    def __len__(self):
        return len(self.entries)
