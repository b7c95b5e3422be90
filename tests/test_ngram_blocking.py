"""Tests for mue.generation.ngram_blocking.NGramBlocker (n-gram repeat blocking)."""
import math

import pytest
import torch

from mue.generation.ngram_blocking import NGramBlocker

PAD, EOS = 1, 2

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_banned(tokens, step, n, vocab):
    """Per-row pure-Python reference: (rows, vocab) bool mask of banned tokens at `step`."""
    banned = torch.zeros(tokens.size(0), vocab, dtype=torch.bool)
    for row in range(tokens.size(0)):
        seq = tokens[row, : step + 1].tolist()  # the tokens generated so far
        if len(seq) < n:
            continue
        last = seq[len(seq) - n + 1 :]  # the row's last n - 1 tokens ([] for n = 1)
        for i in range(len(seq) - n + 1):
            if seq[i : i + n - 1] == last:
                banned[row, seq[i + n - 1]] = True
    return banned


def random_sequences(rows, length, vocab, seed):
    """Random hypotheses: column 0 is EOS (fairseq's BOS), the rest drawn from [EOS, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(EOS, vocab, (rows, length), generator=gen)
    tokens[:, 0] = EOS
    return tokens


def buffer_at(sequences, step):
    """The generator's token buffer at `step`: columns after `step` are still padding."""
    buf = sequences.clone()
    buf[:, step + 1 :] = PAD
    return buf


def random_lprobs(rows, vocab, seed, dtype=torch.float32):
    """Finite random log-probabilities."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen).log_softmax(-1).to(dtype)


def assert_only_banned_changed(out, before, banned):
    """Banned entries are -inf; all others are bit-identical to `before`."""
    assert torch.all(out[banned] == -math.inf)
    keep = ~banned
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
    assert torch.equal(out[keep].view(bits), before[keep].view(bits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_reference_on_random_buffers(n, device):
    """Banned sets equal the per-row reference for every step of padded random buffers."""
    rows, length, vocab = 6, 14, 8
    blocker = NGramBlocker(n)
    total_banned = 0
    for seed in range(4):
        sequences = random_sequences(rows, length, vocab, seed)
        for step in range(length):
            buf = buffer_at(sequences, step)
            lprobs = random_lprobs(rows, vocab, seed * 100 + step)
            out = blocker(buf.to(device), lprobs.clone().to(device), 3, 2, step).cpu()
            expected = reference_banned(buf, step, n, vocab)
            assert torch.equal(out == -math.inf, expected), (seed, step)
            assert_only_banned_changed(out, lprobs, expected)
            total_banned += int(expected.sum())
    assert total_banned > 0  # the inputs do exercise banning


def test_known_example():
    """Hand-checked rows: bigrams and trigrams that recur get their continuation banned."""
    buf = torch.full((2, 9), PAD)
    buf[0, :6] = torch.tensor([EOS, 5, 6, 5, 7, 5])  # bigrams (5,6), (5,7) -> ban 6, 7
    buf[1, :6] = torch.tensor([EOS, 3, 4, 3, 3, 4])  # bigram (4,3) -> ban 3
    out = NGramBlocker(2)(buf, torch.zeros(2, 10), 1, 2, 5)
    assert (out[0] == -math.inf).nonzero().flatten().tolist() == [6, 7]
    assert (out[1] == -math.inf).nonzero().flatten().tolist() == [3]
    out = NGramBlocker(3)(buf, torch.zeros(2, 10), 2, 1, 5)
    assert not torch.isinf(out[0]).any()  # window (7, 5) never started a trigram
    assert (out[1] == -math.inf).nonzero().flatten().tolist() == [3]  # window (3,4): (3,4,3)
    out = NGramBlocker(1)(buf, torch.zeros(2, 10), 2, 1, 5)
    assert (out[0] == -math.inf).nonzero().flatten().tolist() == [EOS, 5, 6, 7]


def test_fairseq_fallback_blocks_nothing_where_blocker_does():
    """fairseq's pure-Python fallback, called as the generator calls it, never bans anything."""
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    max_len, rows, vocab = 10, 4, 7
    sequences = random_sequences(rows, max_len + 2, vocab, seed=7)
    for n in (1, 2, 3):
        fallback = NGramRepeatBlock(n, use_extension=False)
        ours = NGramBlocker(n)
        ours_total = 0
        for step in range(max_len + 1):  # the generator's steps; the buffer has max_len + 2 columns
            buf = buffer_at(sequences, step)
            lprobs = random_lprobs(rows, vocab, step)
            theirs = fallback(buf, lprobs.clone(), 2, 2, step)
            assert not torch.isinf(theirs).any(), (n, step)  # the bug: nothing is blocked
            ours_total += int(torch.isinf(ours(buf, lprobs.clone(), 2, 2, step)).sum())
            if n > 1:
                # Handed only the generated prefix, the fallback agrees with us: the bug is the
                # window it reads from the padded tail of the buffer.
                fixed = fallback(buf[:, : step + 1], lprobs.clone(), 2, 2, step)
                assert torch.equal(fixed == -math.inf, ours(buf, lprobs.clone(), 2, 2, step) == -math.inf)
        assert ours_total > 0, n


@pytest.mark.parametrize("n", [2, 3])
def test_batch_of_64_rows(n):
    """A 16 x 4 beam batch matches the per-row reference; other entries stay bit-identical."""
    bsz, beam, length, vocab = 16, 4, 20, 10
    sequences = random_sequences(bsz * beam, length, vocab, seed=123)
    blocker = NGramBlocker(n)
    for step in (n - 2, n - 1, 7, length - 1):
        buf = buffer_at(sequences, step)
        lprobs = random_lprobs(bsz * beam, vocab, step)
        out = blocker(buf, lprobs.clone(), bsz, beam, step)
        expected = reference_banned(buf, step, n, vocab)
        assert torch.equal(out == -math.inf, expected)
        assert_only_banned_changed(out, lprobs, expected)
    assert expected.any(dim=1).sum() > 10  # many rows ban something at the last step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_lprobs(dtype, device):
    """fp16 / bf16 (and fp64) lprobs ban the same entries, in place, leaving the rest untouched."""
    rows, length, vocab = 8, 12, 6
    sequences = random_sequences(rows, length, vocab, seed=5)
    blocker = NGramBlocker(2)
    for step in range(length):
        buf = buffer_at(sequences, step).to(device)
        lprobs = random_lprobs(rows, vocab, step, dtype).to(device)
        before = lprobs.clone()
        out = blocker(buf, lprobs, 4, 2, step)
        assert out is lprobs and out.dtype == dtype
        expected = reference_banned(buf.cpu(), step, 2, vocab)
        assert torch.equal((out == -math.inf).cpu(), expected)
        assert_only_banned_changed(out.cpu(), before.cpu(), expected)


def test_too_early_and_bad_arguments():
    """Nothing is banned before n tokens exist; bad n or row counts raise ValueError."""
    buf = torch.full((2, 6), PAD)
    buf[:, :2] = torch.tensor([[EOS, 3], [EOS, 3]])
    lprobs = torch.zeros(2, 5)
    assert not torch.isinf(NGramBlocker(3)(buf, lprobs, 2, 1, 0)).any()
    assert not torch.isinf(NGramBlocker(3)(buf, lprobs, 2, 1, 1)).any()  # only 2 tokens so far
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n must be"):
            NGramBlocker(bad)
    with pytest.raises(ValueError, match="expected 4 rows"):
        NGramBlocker(2)(buf, lprobs, 2, 2, 1)
