"""Pre-LayerNorm encoder and decoder layers with OFA's NormFormer extras (a LayerNorm on each
attention output, one on the FFN hidden, per-head gains) and drop-path on every residual branch."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from .attention import Attention


class _Layer(nn.Module):
    def __init__(self, dim, ffn_dim, heads, dropout, attention_dropout, activation_dropout, drop_path, scale_factor):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.drop_path = drop_path
        self.self_attn = Attention(dim, heads, attention_dropout, scale_factor)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def _residual(self, branch, residual):
        return residual + stochastic_depth(self.dropout(branch), self.drop_path, "row", self.training)

    def _feed_forward(self, x):
        """fc1 -> GELU -> LayerNorm(ffn) -> fc2 on the pre-normed input, as a residual branch."""
        h = self.activation_dropout(F.gelu(self.fc1(self.final_layer_norm(x))))
        return self._residual(self.fc2(self.ffn_layernorm(h)), x)

    def self_kv(self, x: torch.Tensor):
        """Self-attention keys/values this layer derives from its input x [B, T, C]."""
        return self.self_attn.project_kv(self.self_attn_layer_norm(x))


class EncoderLayer(_Layer):
    def __init__(self, dim, ffn_dim, heads, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, drop_path=0.0,
                 scale_factor=2.0):
        super().__init__(dim, ffn_dim, heads, dropout, attention_dropout, activation_dropout, drop_path, scale_factor)
        self.attn_ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], blocked: Optional[torch.Tensor]):
        """x [B, T, C]; bias [B|1, H, T, T]; blocked [B, 1, 1, T] (padding) or None."""
        k, v = self.self_kv(x)
        h = self.self_attn(self.self_attn_layer_norm(x), k, v, bias, blocked)
        x = self._residual(self.attn_ln(h), x)
        return self._feed_forward(x)


class DecoderLayer(_Layer):
    def __init__(self, dim, ffn_dim, heads, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, drop_path=0.0,
                 scale_factor=2.0):
        super().__init__(dim, ffn_dim, heads, dropout, attention_dropout, activation_dropout, drop_path, scale_factor)
        self.self_attn_ln = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, heads, attention_dropout, scale_factor)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn_ln = nn.LayerNorm(dim)

    def cross_kv(self, encoder_out: torch.Tensor):
        """Cross-attention keys/values from the encoder output [B, S, C] (computed once per input)."""
        return self.encoder_attn.project_kv(encoder_out)

    def forward(self, x, self_k, self_v, self_bias, self_blocked, cross_k, cross_v, cross_bias, cross_blocked):
        """x [B, Tq, C] the new positions; self_k/v [B, H, Tk, Dh] all visible positions (this one
        included); cross_k/v [B, H, S, Dh]."""
        x = self.self_attention(x, self_k, self_v, self_bias, self_blocked)
        x = self.cross_attention(x, cross_k, cross_v, cross_bias, cross_blocked)
        return self._feed_forward(x)

    # the three residual blocks, for callers that lay rows out differently per block (the cached decoder
    # attends to per-source cross keys/values with its rows grouped by source)
    def self_attention(self, x, k, v, bias, blocked):
        h = self.self_attn(self.self_attn_layer_norm(x), k, v, bias, blocked)
        return self._residual(self.self_attn_ln(h), x)

    def cross_attention(self, x, k, v, bias, blocked):
        h = self.encoder_attn(self.encoder_attn_layer_norm(x), k, v, bias, blocked)
        return self._residual(self.cross_attn_ln(h), x)

    def feed_forward(self, x):
        return self._feed_forward(x)
