"""Host-device syncs on the exit path: counted (mue.exiting.syncs), and a fixed small number per generated
token in the decoder's dense layout, whatever the number of layers and rows."""
import pytest
import torch

from mue.exiting.config import exit_config
from mue.exiting.session import exit_session
from mue.exiting.syncs import SyncCounter
from mue.models import build_arch
from ofa_reference import randomize_, tiny_dictionary


def test_the_counter_sees_every_kind_of_sync():
    x = torch.arange(6)
    with SyncCounter() as syncs:
        y = x * 2 + 1  # no sync
        torch.where(x > 2, x, y).sum()
    assert syncs.count == 0
    with SyncCounter() as syncs:
        x[0].item(), int(x[1]), bool(x[2] > 0), x.tolist(), x[x > 2], (x > 2).nonzero(), torch.equal(x, x), x.cpu()
    assert syncs.count == 8, syncs.ops
    assert x.tolist() == [0, 1, 2, 3, 4, 5]  # the methods are back


def _model(layers):
    torch.manual_seed(0)
    model = build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), decoder_layers=layers, dropout=0.0)
    return randomize_(model, seed=1).eval()


def _syncs_per_step(model, bsz, beam, layout, steps=5, device="cpu"):
    """Syncs inside the decoder's steps and beam reorders, per generated token (fairseq's own loop aside)."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 44, (bsz, 6), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    images = torch.randn(bsz, 3, 32, 32, generator=g)
    src, images, model = src.to(device), images.to(device), model.to(device)
    order = torch.arange(bsz, device=device).repeat_interleave(beam)
    config = exit_config(img_thres=0.9, txt_thres=0.9, dec_thres=0.5, dec_compaction=layout)
    counts = []
    with torch.no_grad(), exit_session(model, config):
        enc = model.encoder.reorder_encoder_out(model.encoder(src, None, images), order)
        prev = torch.zeros(bsz * beam, 1, dtype=torch.long, device=device)
        state = {}
        for step in range(steps):
            with SyncCounter() as syncs:
                if step:  # beam search moves rows within each source's beams
                    shuffle = order * beam + torch.randint(0, beam, order.shape, generator=g).to(device)
                    model.decoder.reorder_incremental_state_scripting(state, shuffle)
                    enc = model.encoder.reorder_encoder_out(enc, shuffle)
                    prev = prev[shuffle]
                logits, _ = model.decoder(prev, encoder_out=enc, incremental_state=state)
            counts.append(syncs.count)
            prev = torch.cat([prev, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return counts


def test_dense_layout_syncs_a_fixed_small_number_of_times_per_token():
    """One check per step that each source's beams are grouped (so they read its cross keys/values in
    place); nothing per layer or per row. The rows layout, for the CPU, syncs per layer (free there)."""
    counts = {(layers, bsz): _syncs_per_step(_model(layers), bsz, 3, "dense") for layers in (6, 12) for bsz in (2, 8)}
    assert all(c == [1] * 5 for c in counts.values()), counts


def test_rows_layout_syncs_once_per_layer_whatever_the_batch():
    """The default layout reads the active rows' count at each layer (to skip layers no row reaches), plus
    the grouping check: layers + 1 per step, independent of the rows in the batch."""
    for layers in (6, 12):
        for bsz in (2, 8):
            assert _syncs_per_step(_model(layers), bsz, 3, "rows") == [layers + 1] * 5, (layers, bsz)
