"""Relative-position bucket tables and absolute-position attention bias, as OFA defines them.

The tables are derived buffers: they are recomputed from the bucket sizes, never loaded from a
checkpoint, so a checkpoint cannot smuggle in a table that disagrees with the model's settings.
"""
import math

import torch

# OFA always lays its 1D buckets out over 1024 positions (the log-spaced ones depend on it),
# whatever the model's maximum source/target length.
OFA_BUCKET_POSITIONS = 1024


def token_bucket_table(bucket_size: int = 256, max_position: int = 1024) -> torch.Tensor:
    """[max_position, max_position] bucket ids for 1D text offsets (query minus key).

    Offsets with |d| < bucket_size/2 keep their own bucket; longer ones share log-spaced buckets
    up to `max_position`. Ids are shifted to start at 0 (table of 2*bucket_size - 1 rows).
    """
    pos = torch.arange(max_position)
    offset = pos[:, None] - pos[None, :]
    half = bucket_size // 2
    near = (offset < half) & (offset > -half)
    magnitude = torch.where(near, torch.full_like(offset, half - 1), offset.abs())
    log_scale = math.log((max_position - 1) / half)
    log_bucket = torch.ceil(torch.log(magnitude / half) / log_scale * (half - 1)) + half
    log_bucket = log_bucket.int()
    bucket = torch.where(magnitude.le(half), offset, log_bucket * torch.sign(offset))
    return bucket.long() + bucket_size - 1


def image_bucket_table(bucket_size: int = 42) -> torch.Tensor:
    """[n+1, n+1] bucket ids (n = bucket_size**2) for 2D offsets between patch position ids.

    Position id 0 is reserved (a special token); ids `row*bucket_size + col + 1` are patches. A table
    of (2*bucket_size-1)**2 + 3 rows: one bucket per (d_row, d_col), plus three for id 0's pairs.
    """
    side = 2 * bucket_size - 1
    n_distance = side * side + 3
    rows = torch.arange(bucket_size).repeat_interleave(bucket_size)
    cols = torch.arange(bucket_size).repeat(bucket_size)
    d_row = rows[:, None] - rows[None, :] + bucket_size - 1
    d_col = cols[:, None] - cols[None, :] + bucket_size - 1
    table = torch.zeros(bucket_size * bucket_size + 1, bucket_size * bucket_size + 1, dtype=torch.long)
    table[1:, 1:] = d_row * side + d_col
    table[0, :] = n_distance - 3
    table[:, 0] = n_distance - 2
    table[0, 0] = n_distance - 1
    return table


def image_position_ids(height: int, width: int, bucket_size: int = 42) -> torch.Tensor:
    """Position ids `row*bucket_size + col + 1` of an `height x width` patch grid, row-major."""
    rows = torch.arange(height)[:, None] * bucket_size
    cols = torch.arange(width)[None, :]
    return (rows + cols + 1).reshape(-1)


def attention_bias(pos_q: torch.Tensor, pos_k: torch.Tensor, heads: int, scaling: float) -> torch.Tensor:
    """Per-head bias q.k from position features: [..., Tq, C] x [..., Tk, C] -> [..., heads, Tq, Tk]."""
    q = pos_q.unflatten(-1, (heads, -1)).transpose(-3, -2) * scaling
    k = pos_k.unflatten(-1, (heads, -1)).transpose(-3, -2)
    return q @ k.transpose(-1, -2)
