"""The exit-aware generator: fairseq's beam search with MuE's exits attached (issue 5 invariants a, b)."""
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from mue.generation import MueSequenceGenerator
from mue.models import build_arch
from ofa_reference import randomize_, tiny_dictionary

EXITS = dict(img_thres=0.9, txt_thres=0.9, dec_thres=0.9, dec_schedule="decay")


@pytest.fixture(scope="module")
def model_and_dict():
    torch.manual_seed(0)
    d = tiny_dictionary(60)
    model = build_arch("mue_ofa_micro", d, dropout=0.0).eval()
    randomize_(model, seed=1)
    return model, d


def make_sample(d, bsz, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, len(d), (bsz, 9), generator=g)
    src[:, 0], src[:, -1] = d.bos(), d.eos()
    src[0, 6:] = d.pad()  # one padded row
    src[0, 5] = d.eos()
    return {"id": torch.arange(bsz), "net_input": {
        "src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1),
        "patch_images": torch.randn(bsz, 3, 64, 64, generator=g), "patch_masks": torch.ones(bsz, dtype=torch.bool)}}


def hyps(generator, model, sample):
    with torch.no_grad():
        out = generator.generate([model], sample)
    return [(h[0]["tokens"].tolist(), float(h[0]["score"])) for h in out]


def test_generation_starts_from_bos_like_training(model_and_dict):
    """Greedy decoding equals a hand-written greedy loop that feeds <s> first, as training does."""
    model, d = model_and_dict
    sample = make_sample(d, 3)
    gen = MueSequenceGenerator([model], d, beam_size=1, max_len_b=6, min_len=6)
    got = [h[0] for h in hyps(gen, model, sample)]
    net = sample["net_input"]
    prev = torch.full((3, 1), d.bos())
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(net["src_tokens"], net["src_lengths"], prev, net["patch_images"], net["patch_masks"])
            lprobs = logits[:, -1].log_softmax(-1)
            lprobs[:, [d.pad(), d.unk(), d.eos()]] = -float("inf")  # min_len forbids eos; fairseq bans pad/unk
            prev = torch.cat([prev, lprobs.argmax(-1, keepdim=True)], 1)
    assert [g[:6] for g in got] == prev[:, 1:].tolist()


@pytest.mark.parametrize("beam", [1, 4])
def test_thresholds_of_one_reproduce_fairseqs_generator(model_and_dict, beam):
    model, d = model_and_dict
    sample = make_sample(d, 5)
    ours = MueSequenceGenerator([model], d, exit_config={}, beam_size=beam, max_len_b=8)
    plain = SequenceGenerator([model], d, beam_size=beam, max_len_b=8)
    with torch.no_grad():
        expected = plain.generate([model], sample, bos_token=d.bos())
    assert hyps(ours, model, sample) == [(h[0]["tokens"].tolist(), float(h[0]["score"])) for h in expected]
    summary = ours.stats.summary()
    assert summary["expected_time_reduction"] == 0.0 and summary["flops_spent"] == summary["flops_full"]


def test_exits_save_layers_and_are_counted(model_and_dict):
    model, d = model_and_dict
    sample = make_sample(d, 4)
    gen = MueSequenceGenerator([model], d, exit_config=EXITS, beam_size=3, max_len_b=8)
    hyps(gen, model, sample)
    s = gen.stats.summary()
    assert s["n_samples"] == 4 and s["expected_time_reduction"] > 0
    assert s["mean_decoder_layers"] < s["n_dec_layers"] and s["flops_spent"] < s["flops_full"]
    assert s["flops_by_component"]["kv_fill"]["spent"] > 0  # copy policy fills skipped layers' caches
    assert model.encoder.exit_settings is None and model.decoder.exit_settings is None  # the session ended


def test_a_rows_output_does_not_depend_on_its_batch(model_and_dict):
    """Invariant (b): batch of 6 vs each row alone, beam 3, exits on."""
    model, d = model_and_dict
    sample = make_sample(d, 6, seed=3)
    batched = hyps(MueSequenceGenerator([model], d, exit_config=EXITS, beam_size=3, max_len_b=8), model, sample)
    for i in range(6):
        one = {"id": sample["id"][i:i + 1],
               "net_input": {k: v[i:i + 1] for k, v in sample["net_input"].items()}}
        one["net_input"]["src_tokens"] = one["net_input"]["src_tokens"][:, : int(one["net_input"]["src_lengths"])]
        alone = hyps(MueSequenceGenerator([model], d, exit_config=EXITS, beam_size=3, max_len_b=8), model, one)
        assert alone[0][0] == batched[i][0]
        assert alone[0][1] == pytest.approx(batched[i][1], abs=1e-4)


def test_bad_thresholds_are_refused_when_the_generator_is_built(model_and_dict):
    model, d = model_and_dict
    for bad in (float("nan"), -2.0, "abc"):
        with pytest.raises(ValueError, match="--dec-thres"):
            MueSequenceGenerator([model], d, exit_config={"dec_thres": bad})


def test_a_rows_decoder_thresholds_do_not_depend_on_its_batch_mates(model_and_dict, monkeypatch):
    """N of the decay schedule is --dec-decay-len, not derived from the batch: with max_len_a > 0 the
    generation length grows with the padded source length, the thresholds must not."""
    from mue.exiting.settings import ExitSettings

    model, d = model_and_dict
    used = []
    original = ExitSettings.dec_threshold
    monkeypatch.setattr(ExitSettings, "dec_threshold",
                        lambda self, step: used.append((step, original(self, step))) or used[-1][1])
    short = make_sample(d, 1, seed=5)
    longer = make_sample(d, 3, seed=6)
    longer["net_input"]["src_tokens"] = torch.cat(  # batch mates with a longer source
        [longer["net_input"]["src_tokens"], torch.randint(4, len(d), (3, 12))], 1)
    longer["net_input"]["src_tokens"][:, -1] = d.eos()
    batch = {"id": torch.arange(4), "net_input": {
        k: torch.cat([short["net_input"][k] if k != "src_tokens" else torch.cat(
            [short["net_input"][k], torch.full((1, 12), d.pad())], 1), longer["net_input"][k]])
        for k in short["net_input"]}}
    batch["net_input"]["src_lengths"] = batch["net_input"]["src_tokens"].ne(d.pad()).sum(1)
    exits = dict(EXITS, dec_decay_len=8)

    def run(sample):
        used.clear()
        gen = MueSequenceGenerator([model], d, exit_config=exits, beam_size=1, max_len_a=1, max_len_b=2)
        return hyps(gen, model, sample), dict(used)

    (alone,), thresholds_alone = run(short)
    batched, thresholds_batched = run(batch)
    assert thresholds_alone and all(thresholds_batched[t] == v for t, v in thresholds_alone.items())
    assert thresholds_alone[1] < thresholds_alone[0]  # the schedule decays over N = 8 steps
    # fairseq's own length limit grows with the batch's padded source (max_len_a): alone, the row is cut
    # at its limit; batched, the same tokens come first
    assert len(alone[0]) < len(batched[0][0]) and batched[0][0][:len(alone[0]) - 1] == alone[0][:-1]


def _one_token_model(model, token):
    """A copy of `model` whose every output prefers `token`: the final LayerNorm's output is the
    (scaled) embedding of `token`, whatever the input."""
    import copy

    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.decoder.layer_norm.weight.zero_()
        biased.decoder.layer_norm.bias.copy_(5 * biased.decoder.embed_tokens.weight[token])
    return biased


def _repeated_bigrams(tokens):
    pairs = list(zip(tokens, tokens[1:]))
    return len(pairs) - len(set(pairs))


@pytest.mark.parametrize("beam", [1, 5])
def test_no_repeat_ngram_size_blocks_repeats(model_and_dict, beam):
    """fairseq's CPU fallback blocks nothing (it reads the padded token buffer); ours must."""
    model, d = model_and_dict
    favourite = int(torch.matmul(model.decoder.embed_tokens.weight, model.decoder.embed_tokens.weight.T)
                    .diagonal()[4:].argmax()) + 4
    biased = _one_token_model(model, favourite)
    sample = make_sample(d, 3, seed=2)
    common = dict(beam_size=beam, max_len_b=8, min_len=8)
    free = MueSequenceGenerator([biased], d, exit_config=EXITS, **common)
    assert any(_repeated_bigrams(h[0]) > 0 for h in hyps(free, biased, sample))  # the test is not vacuous
    blocked = MueSequenceGenerator([biased], d, exit_config=EXITS, no_repeat_ngram_size=2, **common)
    with torch.no_grad():
        out = blocked.generate([biased], sample)
    for row in out:
        for hyp in row:
            tokens = hyp["tokens"].tolist()
            assert len(tokens) >= 8 and _repeated_bigrams(tokens) == 0, tokens


def test_a_model_that_is_not_a_mue_model_is_a_clear_error(model_and_dict):
    from fairseq.models.transformer import TransformerModel

    from mue.exiting.session import NotAMueModelError

    _, d = model_and_dict
    other = TransformerModel.__new__(TransformerModel)
    torch.nn.Module.__init__(other)
    with pytest.raises(NotAMueModelError, match="MueSequenceGenerator: early exits need a mue_ofa model.*"
                                                "TransformerModel"):
        MueSequenceGenerator([other], d)


def _generate(model, d, sample, exits, beam, share_sources=True, **kwargs):
    model.encoder.share_sources = share_sources
    try:
        gen = MueSequenceGenerator([model], d, exit_config=exits, beam_size=beam, max_len_b=8, **kwargs)
        with torch.no_grad():
            out = gen.generate([model], sample)
    finally:
        model.encoder.share_sources = True
    return [[(h["tokens"].tolist(), float(h["score"])) for h in row] for row in out], gen.stats.summary()


def _assert_same(got, expected):
    for row_got, row_expected in zip(got, expected):
        assert [h[0] for h in row_got] == [h[0] for h in row_expected]
        assert [h[1] for h in row_got] == pytest.approx([h[1] for h in row_expected], abs=1e-5)


@pytest.mark.parametrize("beam", [1, 5])
@pytest.mark.parametrize("kv_policy", ["copy", "recompute", "drop"])
@pytest.mark.parametrize("exits", [{}, EXITS])
def test_cross_keys_values_per_source_are_exact(model_and_dict, monkeypatch, beam, kv_policy, exits):
    """One set of cross keys/values per source, read in place by its beams, equals the per-row copies
    fairseq's encoders make; the rows layout equals the dense one; fewer cross k/v are computed."""
    from mue.models.decoder import MueDecoder

    import copy

    model, d = model_and_dict
    model = copy.deepcopy(model)
    with torch.no_grad():  # a pull toward eos that ends some sentences early (fairseq then drops them)
        bias = 2.0 if beam == 1 else (1.5 if exits else 2.5)
        model.decoder.layer_norm.bias.add_(bias * model.decoder.embed_tokens.weight[d.eos()])
    sample = make_sample(d, 6, seed=4)
    shrinks = []
    original = MueDecoder.reorder_incremental_state
    monkeypatch.setattr(MueDecoder, "reorder_incremental_state", lambda self, state, order: (
        shrinks.append(order.numel()), original(self, state, order))[1])
    config = dict(exits, kv_policy=kv_policy)
    shared, stats = _generate(model, d, sample, config, beam)
    per_row, stats_per_row = _generate(model, d, sample, config, beam, share_sources=False)
    _assert_same(shared, per_row)
    if beam > 1:
        assert stats["flops_by_component"]["cross_kv"]["spent"] * beam == \
            stats_per_row["flops_by_component"]["cross_kv"]["spent"]
    for layout in ("rows", "dense"):
        _assert_same(_generate(model, d, sample, dict(config, dec_compaction=layout), beam)[0], shared)
    assert len(set(shrinks)) > 1, "no sentence finished early: the source compaction was not exercised"
