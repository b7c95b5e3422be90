"""SNLI-VE with OFA's decoder prompt (--decoder-prompt, OFA's prompt type prev_output): the decoder reads the
question and answers after it, in training (dataset layout) and in scoring (score_candidates)."""
import torch

from mue.exiting.config import exit_config
from mue.exiting.session import exit_session
from mue.models import build_arch
from mue.tasks.snli_ve import score_candidates
from ofa_reference import randomize_, tiny_dictionary

CANDIDATES = [torch.tensor([5, 2]), torch.tensor([6, 2]), torch.tensor([7, 8, 2])]


def model_and_sample():
    torch.manual_seed(0)
    model = randomize_(build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), dropout=0.0), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 44, (4, 9), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[1, 6], src[1, 7:] = 2, 1  # shorter questions, right-padded
    src[3, 4], src[3, 5:] = 2, 1
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(1).sum(1),
                            "patch_images": torch.randn(4, 3, 48, 48, generator=g),
                            "patch_masks": torch.ones(4, dtype=torch.bool)}}
    return model, sample


def row(sample, i):
    n = int(sample["net_input"]["src_lengths"][i])
    return {"net_input": {"src_tokens": sample["net_input"]["src_tokens"][i:i + 1, :n],
                          "src_lengths": sample["net_input"]["src_lengths"][i:i + 1],
                          "patch_images": sample["net_input"]["patch_images"][i:i + 1],
                          "patch_masks": sample["net_input"]["patch_masks"][i:i + 1]}}


def test_scores_are_the_answer_log_probs_after_the_question():
    model, sample = model_and_sample()
    with torch.no_grad():
        scores, token_scores = score_candidates(model, sample, CANDIDATES, return_token_scores=True,
                                                decoder_prompt=True)
        for i in range(4):
            one = row(sample, i)
            src = one["net_input"]["src_tokens"][0]
            encoder_out = model.encoder(**one["net_input"])
            for j, cand in enumerate(CANDIDATES):
                prev = torch.cat([src[:-1], cand[:-1]]).unsqueeze(0)
                lprobs = torch.log_softmax(model.decoder(prev, encoder_out=encoder_out)[0][0].float(), -1)
                answer = lprobs[src.numel() - 2:].gather(-1, cand.unsqueeze(-1)).squeeze(-1)
                torch.testing.assert_close(token_scores[i, j, :cand.numel()], answer, atol=1e-5, rtol=0)
                torch.testing.assert_close(scores[i, j], answer.sum(), atol=1e-5, rtol=0)
        without = score_candidates(model, sample, CANDIDATES, decoder_prompt=False)
    assert not torch.allclose(scores, without)  # the prompt changes what the decoder sees


def test_scores_with_exits_do_not_depend_on_the_batch():
    """Questions of other lengths in the batch (padding) change no row's scores or exits."""
    model, sample = model_and_sample()
    exits = exit_config(img_thres=0.9, txt_thres=0.9, dec_thres=0.5)
    with torch.no_grad():
        with exit_session(model, exits) as settings:
            batched = score_candidates(model, sample, CANDIDATES, decoder_prompt=True)
        depths = torch.cat([step.depths.flatten() for step in settings.trace.decoder])
        for i in range(4):
            with exit_session(model, exits):
                alone = score_candidates(model, row(sample, i), CANDIDATES, decoder_prompt=True)
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)
    assert depths.min() < depths.max()  # the answer tokens exited at several depths


def test_dataset_layout_puts_the_loss_on_the_answer_only(tmp_path):
    from mue.data.synthetic import generate
    from mue.data.datasets import SnliVeDataset
    from mue.data.dictionary import build_ofa_dictionary
    from mue.data.readers import OfaSnliVeTsv
    from mue.data.tokenizer import Tokenizer

    paths = generate(str(tmp_path), seed=1, num_train=2, num_valid=1, num_test=1, image_size=16)
    d = build_ofa_dictionary(paths["dict"], num_codes=0, num_bins=0)
    plain, prompted = (SnliVeDataset("train", OfaSnliVeTsv(paths["train"]["snli_ve"]), d, Tokenizer(),
                                     decoder_prompt=flag, patch_image_size=16) for flag in (False, True))
    for i in range(len(plain)):
        a, b = plain[i], prompted[i]
        question = b["source"][:-1]
        assert torch.equal(b["prev_output_tokens"], torch.cat([question, a["target"][:-1]]))
        assert b["target"].numel() == b["prev_output_tokens"].numel()
        assert torch.equal(b["target"][question.numel() - 1:], a["target"])
        assert b["target"][:question.numel() - 1].eq(d.pad()).all()
        assert not b["constraint_mask"][:question.numel() - 1].any()
        assert torch.equal(b["constraint_mask"][question.numel() - 1:], a["constraint_mask"])
