"""Criterion mue_scst: leave-one-out baseline, teacher-forced log-probs, CIDEr-D rewards with training
document frequencies (cached to a file), forward/backward on a micro model, and fairseq-train end to end."""
import json
import logging
import math

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import mue  # noqa: F401  (registers tasks, models, criterions)
from mue.criterions import scst
from mue.criterions.mue import MueCriterion
from mue.evaluation.cider_d import CiderD

SMALL = ["--num-codes", "0", "--num-bins", "0", "--patch-image-size", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), num_train=8, num_valid=4, num_test=4, image_size=32)
    return root / "caption"



def make_cfg(argv):
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


def setup(data_dir, *criterion_args):
    cfg = make_cfg([str(data_dir), "--task", "mue_caption", "--arch", "mue_ofa_micro", *SMALL,
                    "--criterion", "mue_scst", *criterion_args])
    task = tasks.setup_task(cfg.task)
    return task, cfg, task.build_criterion(cfg.criterion)


def train_batch(task, n=2):
    task.load_dataset("train")
    ds = task.dataset("train")
    return ds.collater([ds[i] for i in range(n)])


# ---- pure functions ------------------------------------------------------------------------------


def test_leave_one_out_baseline_on_crafted_rewards():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # by hand: each entry is the mean of the other two entries of its row
    expected = torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]])
    assert torch.allclose(scst.leave_one_out_baseline(rewards), expected)
    with pytest.raises(ValueError, match="k>=2"):
        scst.leave_one_out_baseline(torch.ones(3, 1))
    # the loss gradient w.r.t. each log-prob is -(r - b); the advantage itself carries no gradient
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    loss, baseline = scst.scst_loss(log_probs, rewards)
    loss.backward()
    assert torch.allclose(log_probs.grad, -(rewards - expected))
    assert loss.item() == pytest.approx(-((rewards - expected) * log_probs.detach()).sum().item())


def test_sequence_log_probs_ignore_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    target = torch.tensor([[4, 2, 1], [5, 1, 1]])  # pad = 1
    lp = torch.log_softmax(logits, -1)
    expected = [lp[0, 0, 4] + lp[0, 1, 2], lp[1, 0, 5]]
    assert torch.allclose(scst.sequence_log_probs(logits, target, pad=1), torch.stack(expected), atol=1e-6)


# ---- CIDEr-D document frequencies and rewards -----------------------------------------------------


def test_training_references_are_grouped_per_image(data):
    task, _, _ = setup(data)
    refs = scst.training_references(task)  # train.tsv: one caption per row, 5 rows per image
    assert len(refs) == 8 and all(len(r) == len(set(r)) >= 1 for r in refs)
    rows = (data / "train.tsv").read_text().splitlines()
    assert sum(len(r) for r in refs) <= len(rows) == 40


def test_cider_df_is_cached_to_file_and_reused(data, tmp_path, monkeypatch):
    path = tmp_path / "cache" / "train_df.json"
    task, _, criterion = setup(data, "--scst-cider-df", str(path))
    first = criterion.scorer
    assert path.is_file() and first.num_docs == 8  # one document per training image
    assert first.df == CiderD.from_corpus(scst.training_references(task)).df

    def no_training_refs(task):
        raise AssertionError("the cached file should have been read")

    monkeypatch.setattr(scst, "training_references", no_training_refs)
    _, _, again = setup(data, "--scst-cider-df", str(path))
    assert again.scorer.df == first.df and again.scorer.num_docs == first.num_docs

    path.write_text('{"format": "mue-cider-d-df", "n": 4, "num_d')  # truncated json
    _, _, broken = setup(data, "--scst-cider-df", str(path))
    with pytest.raises(ValueError, match=r"--scst-cider-df .*train_df.json.*delete it"):
        broken.scorer
    path.write_text(json.dumps({"format": "something else"}))
    _, _, other = setup(data, "--scst-cider-df", str(path))
    with pytest.raises(ValueError, match="not a readable CIDEr-D"):
        other.scorer


def test_reward_of_a_reference_is_highest(data):
    task, _, criterion = setup(data)
    refs = scst.training_references(task)
    mine, other = refs[0], next(r for r in refs[1:] if r[0] not in refs[0])
    d = task.target_dictionary

    def tokens(text):
        return task.tokenizer.encode(" " + text, d, add_bos=False, add_eos=True)

    words = mine[0].split()
    candidates = [tokens(mine[0]), tokens(" ".join(words[: max(1, len(words) // 2)])), tokens(other[0]),
                  tokens(" ".join(reversed(words)))]
    rewards = criterion.rewards([candidates], [mine])
    assert rewards.shape == (1, 4) and int(rewards.argmax()) == 0
    assert rewards[0, 0] > rewards[0, 1:].max()
    assert rewards[0, 0].item() == pytest.approx(criterion.scorer.score(mine[0], mine), rel=1e-6)


def test_special_tokens_and_punctuation_do_not_glue_words_in_the_reward(data):
    """Crafted samples: <mask>, <unk> and punctuation tokens are word breaks before the reward, and the
    reward is CIDEr-D of those clean words (decode-then-normalise would glue "amask", "reda")."""
    task, _, criterion = setup(data)
    d, tok = task.target_dictionary, task.tokenizer

    def ids(*parts):
        out = []
        for part in parts:
            if part in ("<mask>", "<unk>"):
                out.append(d.index(part))
                continue
            enc = tok.encode(part, d)
            assert not enc.eq(d.unk()).any(), f"{part!r} is not in the synthetic dictionary"
            out += enc.tolist()
        return torch.tensor(out + [d.eos()])

    crafted = {  # sampled tokens -> the words rewarded
        ("a", "<mask>", " red", " square"): "a red square",
        ("a", "<unk>", "<mask>", " red", " square"): "a red square",
        (" red", ",", "a", " square"): "red a square",
        ("a", " triangle", ",", " two", " circles", "<mask>"): "a triangle two circles",
        ("<mask>",): "",
    }
    glued = tok.decode(ids("a", "<mask>", " red", " square"), d).strip()
    assert glued == "a<mask> red square"  # what plain decoding gives: normalising it would read "amask"
    refs = ["a red square", "a triangle two circles and a square"]
    for parts, words in crafted.items():
        assert scst.reward_text(tok, d, ids(*parts)) == words, parts
    # the reward is CIDEr-D of the clean words, computed independently
    rows = [ids(*parts) for parts in crafted]
    rewards = criterion.rewards([rows], [refs])
    expected = [criterion.scorer.score(words, refs) for words in crafted.values()]
    assert rewards[0].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert expected[0] > criterion.scorer.score("amask red square", refs)  # gluing changes the reward


# ---- forward / backward -----------------------------------------------------------------------


def test_forward_backward(data, one_thread, monkeypatch):
    task, cfg, criterion = setup(data, "--scst-samples", "3", "--scst-max-len-b", "6")
    model = task.build_model(cfg.model)
    model.train()
    task.load_dataset("train")
    ds = task.dataset("train")
    sample = ds.collater([ds[0], ds[len(ds) - 1]])  # rows of the first and the last training image
    assert "refs" not in sample  # training rows: references come from the dataset by image id
    refs = criterion.references(sample)
    assert refs[0] != refs[1] and refs[0] == ds.references_by_image()[ds.image_id(0)]
    torch.manual_seed(0)
    loss, sample_size, log = criterion(model, sample)
    assert model.training  # sampling ran in eval mode, the mode is restored
    assert sample_size == log["nsamples"] == 6 and math.isfinite(loss.item())
    assert log["reward"] >= 0 and log["baseline"] == pytest.approx(log["reward"], rel=1e-5, abs=1e-6)

    # crafted rewards (non-zero advantages): the gradient reaches decoder and encoder
    monkeypatch.setattr(criterion, "rewards", lambda captions, refs: torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    loss, _, log = criterion(model, sample)
    assert log["reward"] == pytest.approx(3.0) and log["baseline"] == pytest.approx(3.0) and loss.item() != 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(model.decoder.layers[0].fc1.weight.grad.abs().sum()) > 0
    assert float(model.encoder.layers[-1].fc1.weight.grad.abs().sum()) > 0


def test_one_encoder_run_per_image_gives_the_per_row_logits_and_gradients(data, one_thread):
    """SCST encodes each image once and shares it among its k (+ 1) decoder rows (`encoder_rows`): without
    encoder dropout (the stage-2 recipes) the logits and gradients are those of encoding every row's copy."""
    task, cfg, _ = setup(data, "--dropout", "0.0")
    torch.manual_seed(0)  # the weights must not depend on which tests ran before
    model = task.build_model(cfg.model).train()
    net = train_batch(task)["net_input"]
    order = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])  # 3 captions per image, then each image's ground truth
    prev = net["prev_output_tokens"].index_select(0, order)
    keys = ("src_tokens", "src_lengths", "patch_images", "patch_masks")

    def logits_and_grads(shared):
        model.zero_grad()
        if shared:
            logits, _ = model(**{k: net[k] for k in keys}, prev_output_tokens=prev, encoder_rows=order)
        else:
            logits, _ = model(**{k: net[k].index_select(0, order) for k in keys}, prev_output_tokens=prev)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        (logits * weights).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared_logits, shared_grads = logits_and_grads(True)
    row_logits, row_grads = logits_and_grads(False)
    assert torch.allclose(shared_logits, row_logits, atol=1e-5)
    assert shared_grads.keys() == row_grads.keys() and any(n.startswith("encoder.layers") for n in row_grads)
    # Sums in another order: compared relative to the gradient's size. The key biases' gradients are zero in
    # exact arithmetic (softmax ignores a shift shared by a row's logits), so both paths hold rounding noise
    # there, whose size follows the summands, not the result: those are checked to be noise-sized.
    scale = max(float(g.norm()) for g in row_grads.values())
    for name, grad in row_grads.items():
        if float(grad.norm()) < 1e-6 * scale:
            assert name.endswith(("k_proj.bias", "pos_k_linear.bias")), name  # only the key biases
            assert float(shared_grads[name].norm()) < 1e-6 * scale, name
        else:
            assert float((shared_grads[name] - grad).norm()) <= 1e-5 * float(grad.norm()) + 1e-7, name


def test_teacher_forced_log_probs_match_the_generator(data, one_thread, monkeypatch):
    """In eval mode (no dropout) the teacher-forced log-probs of the sampled captions equal the sums of
    the generator's per-token scores: the captions are scored as they were drawn (bos first)."""
    task, cfg, criterion = setup(data, "--scst-samples", "2", "--scst-max-len-b", "5")
    model = task.build_model(cfg.model).eval()
    sample = train_batch(task)
    generator = criterion.generator(model)
    drawn, scored = [], []
    real_generate, real_lp = generator.generate, scst.sequence_log_probs
    monkeypatch.setattr(generator, "generate", lambda *a, **kw: drawn.append(real_generate(*a, **kw)) or drawn[-1])
    monkeypatch.setattr(scst, "sequence_log_probs", lambda *a, **kw: scored.append(real_lp(*a, **kw)) or scored[-1])
    with torch.no_grad():
        criterion(model, sample)
    expected = torch.stack([h["positional_scores"].sum() for hyps in drawn[0] for h in hyps])
    assert torch.allclose(scored[0], expected, atol=1e-4)


def test_captions_never_repeat_a_trigram_by_default(data, one_thread):
    """OFA's stage 2 blocks repeated 3-grams; fairseq's CPU fallback blocks nothing, so the generator uses
    mue's NGramBlocker. A model biased towards one token would otherwise repeat it to the length limit."""
    from mue.generation.ngram_blocking import NGramBlocker

    for beam in ((), ("--scst-beam",)):
        task, cfg, criterion = setup(data, "--scst-samples", "3", "--scst-max-len-b", "8", *beam)
        model = task.build_model(cfg.model).eval()
        with torch.no_grad():  # every logit but one word's is pushed down: without blocking, "w w w w ..."
            word = task.target_dictionary.index("shapes")
            model.decoder.output_projection.bias = torch.nn.Parameter(torch.zeros(len(task.target_dictionary)))
            model.decoder.output_projection.bias[word] = 50.0
        generator = criterion.generator(model)
        assert isinstance(generator.repeat_ngram_blocker, NGramBlocker) and generator.repeat_ngram_blocker.n == 3
        captions = criterion.sample_captions(model, train_batch(task))
        for row in captions:
            for tokens in row:
                words = tokens.tolist()
                trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
                assert len(trigrams) == len(set(trigrams)), words
                assert words.count(word) >= 2  # the bias took hold: the block is what stopped the repeats
    task, cfg, criterion = setup(data, "--scst-no-repeat-ngram-size", "0")
    assert criterion.generator(task.build_model(cfg.model)).repeat_ngram_blocker is None


def test_ce_term_equals_the_layerwise_criterion(data, one_thread):
    task, cfg, criterion = setup(data, "--scst-samples", "2", "--scst-max-len-b", "5", "--scst-ce-weight", "0.5",
                                 "--label-smoothing", "0.1")
    model = task.build_model(cfg.model).eval()
    sample = train_batch(task, 3)
    with torch.no_grad():
        loss, sample_size, log = criterion(model, sample)
        ce_loss, ce_tokens, _ = MueCriterion(task, label_smoothing=0.1).forward(model, sample)
    assert log["ce_ntokens"] == ce_tokens
    assert float(log["ce_loss"]) == pytest.approx(ce_loss.item(), rel=1e-4)
    assert loss.item() == pytest.approx(float(log["scst_loss"]) + 0.5 * ce_loss.item() * sample_size / ce_tokens,
                                        rel=1e-4)


def test_bad_options_are_clear_errors(data):
    with pytest.raises(ValueError, match="--scst-samples must be >= 2"):
        setup(data, "--scst-samples", "1")
    with pytest.raises(ValueError, match="--scst-ce-weight"):
        setup(data, "--scst-ce-weight=-1")


# ---- end to end ------------------------------------------------------------------------------------


def test_fairseq_train_two_updates(data, tmp_path, caplog, one_thread):
    from fairseq_cli import train

    df = tmp_path / "df.json"
    cfg = make_cfg([str(data), "--task", "mue_caption", "--arch", "mue_ofa_micro", *SMALL, "--cpu",
                    "--num-workers", "0", "--batch-size", "2", "--criterion", "mue_scst", "--scst-samples", "2",
                    "--scst-max-len-b", "5", "--scst-cider-df", str(df), "--scst-ce-weight", "0.5",
                    "--optimizer", "adam", "--lr", "1e-3", "--max-update", "2", "--disable-validation",
                    "--save-dir", str(tmp_path / "ckpt"), "--no-epoch-checkpoints", "--log-format", "json",
                    "--log-interval", "1", "--seed", "3"])
    with caplog.at_level(logging.INFO):
        train.main(cfg)
    stats = [json.loads(r.getMessage()) for r in caplog.records
             if r.name.startswith("train") and r.getMessage().startswith("{")]
    assert stats and int(stats[-1]["train_num_updates"]) == 2
    last = stats[-1]
    for key in ("train_loss", "train_reward", "train_baseline", "train_ce_loss"):
        assert math.isfinite(float(last[key])), key
    assert df.is_file() and CiderD.load_df(str(df)).num_docs == 8
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").is_file()
