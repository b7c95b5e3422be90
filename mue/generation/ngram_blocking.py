"""Vectorised, on-device n-gram repeat blocking for beam search.

Without fairseq's CUDA extension, ``--no-repeat-ngram-size`` silently does
nothing: the pure-Python fallback takes its "last n-1 tokens" from the end of
the generator's whole ``(rows, max_len + 2)`` token buffer, which is still
padding at every step, so no earlier n-gram ever matches.

:class:`NGramBlocker` is a drop-in replacement for fairseq's
``NGramRepeatBlock`` with the CUDA extension's semantics.  At ``step`` the
tokens generated so far in a row are ``tokens[row, :step + 1]`` (column 0 is
the BOS/EOS marker).  A token is banned for that row when appending it would
complete an n-gram that already occurs in those tokens, i.e. when some n-gram
``tokens[row, i:i + n]`` (``i + n <= step + 1``) starts with the row's last
n-1 tokens ``tokens[row, step - n + 2:step + 1]``; its last token then gets
-inf.  Nothing is banned while the row has fewer than n tokens.  For n = 1 the
window is empty, so every token already in ``tokens[row, :step + 1]``,
including the leading BOS/EOS, is banned, as the extension does.

Everything runs as a handful of tensor ops on the tensors' device: no per-row
Python loop and no host synchronisation.
"""
import math

import torch
from torch import Tensor, nn


class NGramBlocker(nn.Module):
    """Bans tokens that would repeat an n-gram already in a hypothesis."""

    def __init__(self, n: int):
        """``n``: the n-gram size (>= 1) whose repetition is forbidden."""
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"NGramBlocker: n must be an integer >= 1, got {n!r}")
        self.n = n

    def extra_repr(self) -> str:
        """Shows n in the module's repr."""
        return f"n={self.n}"

    def forward(
        self, tokens: Tensor, lprobs: Tensor, bsz: int, beam_size: int, step: int
    ) -> Tensor:
        """Sets the banned entries of ``lprobs`` to -inf, in place, and returns it.

        ``tokens``: (bsz * beam_size, buffer_len) token buffer whose first
        ``step + 1`` columns are filled; ``lprobs``: (bsz * beam_size, vocab)
        log-probabilities of the next token, any floating dtype.
        """
        rows = bsz * beam_size
        if tokens.size(0) != rows or lprobs.size(0) != rows:
            raise ValueError(
                f"NGramBlocker: expected {rows} rows (bsz {bsz} x beam {beam_size}), "
                f"got tokens {tuple(tokens.shape)} and lprobs {tuple(lprobs.shape)}"
            )
        n = self.n
        if step + 2 - n <= 0:  # fewer than n tokens so far: no complete n-gram
            return lprobs

        seen = tokens[:, : step + 1].long()
        ngrams = seen.unfold(1, n, 1)  # (rows, step + 2 - n, n)
        window = seen[:, step + 2 - n :]  # the row's last n - 1 tokens
        # all() over an empty last dim is True, so for n = 1 every n-gram matches.
        match = (ngrams[:, :, :-1] == window.unsqueeze(1)).all(dim=2)
        # -inf where banned, +inf elsewhere; "amin" leaves the +inf entries'
        # targets untouched and is order-independent when indices repeat.
        values = torch.full(
            match.shape, math.inf, dtype=lprobs.dtype, device=lprobs.device
        ).masked_fill_(match, -math.inf)
        lprobs.scatter_reduce_(1, ngrams[:, :, -1], values, reduce="amin")
        return lprobs
