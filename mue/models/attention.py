"""OFA's multi-head attention: additive position bias, per-head output gain (`c_attn`), and a
query scale of (2 * head_dim) ** -0.5. Keys and values are projected by the caller through
`project_kv`, so that decoders can cache them and fill them for rows that exited early."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0, scale_factor: float = 2.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.c_attn = nn.Parameter(torch.ones(heads))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, T, C] -> keys and values as [B, heads, T, head_dim]."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        blocked: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query [B, Tq, C]; keys/values [B, H, Tk, Dh]; bias broadcastable to [B, H, Tq, Tk];
        blocked: bool, broadcastable to [B, H, Tq, Tk], True where a key must not be seen."""
        q = self._split(self.q_proj(query) * self.scaling)
        mask = None
        if bias is not None or blocked is not None:
            mask = torch.zeros((), dtype=q.dtype, device=q.device) if bias is None else bias.to(q.dtype)
            if blocked is not None:
                mask = mask.masked_fill(blocked, float("-inf"))
            mask = mask.expand(q.size(0), self.heads, q.size(2), keys.size(2))
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=1.0
        )
        out = out * self.c_attn[:, None, None]
        return self.out_proj(out.transpose(1, 2).flatten(2))
