"""Tasks mue_snli_ve and mue_caption: setup and errors, evaluation covering every example, candidate
scoring, the generator hook, and end-to-end fairseq-train / fairseq-generate in-process."""
import json
import logging
import math

import pytest
import torch
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from torch import nn

import mue.tasks  # noqa: F401  (registers the tasks)
from mue.data.readers import DataError
from mue.tasks import vl_task
from mue.tasks.snli_ve import score_candidates

SMALL = ["--num-codes", "0", "--num-bins", "0", "--patch-image-size", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), num_train=4, num_valid=5, num_test=5, image_size=32)
    return root


def make_cfg(argv, parser=None):
    parser = parser or options.get_training_parser()
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))


def make_task(data_dir, task, *extra):
    cfg = make_cfg([str(data_dir), "--task", task, "--arch", "mue_ofa_micro", *SMALL, *extra])
    return tasks.setup_task(cfg.task), cfg


# ---- setup and clear errors -------------------------------------------------------------------


def test_setup_load_and_dictionary(data):
    task, _ = make_task(data / "caption", "mue_caption")
    n_lines = len((data / "dict.txt").read_text().splitlines())
    assert len(task.source_dictionary) == 4 + n_lines + 1  # specials, dict.txt, <mask>; no codes or bins
    assert task.target_dictionary is task.source_dictionary
    task.load_dataset("valid")
    assert len(task.dataset("valid")) == 5 and not task.dataset("valid").is_train
    snli, _ = make_task(data / "snli_ve", "mue_snli_ve")
    snli.load_dataset("test")
    assert len(snli.dataset("test")) == 15
    assert [snli.decode(c) for c in snli.candidates] == ["no", "yes", "maybe"]


def test_missing_split_and_dictionary_errors(data, tmp_path):
    task, _ = make_task(data / "caption", "mue_caption")
    with pytest.raises(DataError, match=r"split 'nosuch'.*caption/nosuch.tsv"):
        task.load_dataset("nosuch")
    empty = tmp_path / "nodict"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no dictionary found: tried .*nodict/dict.txt"):
        make_task(empty, "mue_caption")
    bad = tmp_path / "bad.txt"
    bad.write_text("123 4\nnot-a-count-line\n")
    with pytest.raises(DataError, match=r"bad.txt:2"):
        make_task(data / "caption", "mue_caption", "--dict-file", str(bad))
    no_answers = tmp_path / "no_answers.txt"
    no_answers.write_text("".join(line + "\n" for line in (data / "dict.txt").read_text().splitlines()
                                  if line.split()[0] not in {"3763", "645", "3863"}))  # " yes", " no", " maybe"
    with pytest.raises(DataError, match=r"no_answers.txt.*answer ' (yes|no|maybe)'"):
        make_task(data / "snli_ve", "mue_snli_ve", "--dict-file", str(no_answers))
    with pytest.raises(DataError, match="--data-format coco needs --image-dir"):
        make_task(data / "caption", "mue_caption", "--data-format", "coco",
                  "--coco-json", str(data / "caption" / "valid_refs.json"))[0].load_dataset("valid")


def test_raw_formats_coco_json_and_snli_jsonl(data, tmp_path):
    """Karpathy json + image folder (caption) and SNLI-VE jsonl + image folder, through the tasks."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(images / f"{i}.jpg")
    karpathy = {"images": [{"filename": f"{i}.jpg", "cocoid": i, "split": split,
                            "sentences": [{"raw": "A red square."}, {"raw": "two circles"}]}
                           for i, split in enumerate(["train", "val", "test"])]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    dict_file = str(data / "dict.txt")
    task, _ = make_task(tmp_path, "mue_caption", "--data-format", "coco", "--coco-json",
                        str(tmp_path / "dataset_coco.json"), "--image-dir", str(images), "--dict-file", dict_file)
    task.load_dataset("train")
    task.load_dataset("valid")
    assert len(task.dataset("train")) == 2  # training reads one record per caption
    assert task.dataset("valid")[0]["refs"] == ["a red square", "two circles"]
    snli_dir = tmp_path / "snli"
    snli_dir.mkdir()
    rows = [{"Flickr30K_ID": str(i), "gold_label": label, "sentence1": "a picture", "sentence2": "a red square",
             "pairID": f"p{i}"} for i, label in enumerate(["neutral", "entailment"])]
    (snli_dir / "snli_ve_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    snli, _ = make_task(snli_dir, "mue_snli_ve", "--image-dir", str(images), "--dict-file", dict_file)
    snli.load_dataset("valid")  # auto format: valid -> snli_ve_dev.jsonl
    ds = snli.dataset("valid")
    assert [ds[i]["label"] for i in range(2)] == [2, 1] and ds[0]["uniq_id"] == "p0"
    with pytest.raises(DataError, match=r"split 'test'.*snli_ve_test.jsonl"):
        snli.load_dataset("test")


@pytest.mark.parametrize("option,value", [("--img-thres", "nan"), ("--txt-thres", "-2"), ("--dec-thres", "-inf"),
                                          ("--dec-decay-beta", "1.5"), ("--dec-decay-tau", "-1")])
def test_exit_options_are_validated(data, option, value):
    with pytest.raises(ValueError, match=option):
        make_task(data / "caption", "mue_caption", f"{option}={value}")  # "=": argparse reads "-2" as an option


def test_non_number_threshold_is_a_cli_error(data, capsys):
    with pytest.raises(SystemExit):
        make_task(data / "caption", "mue_caption", "--img-thres", "high")
    assert "--img-thres" in capsys.readouterr().err


# ---- evaluation covers every example ----------------------------------------------------------


def test_evaluation_iterator_scores_every_example(data, caplog):
    task, _ = make_task(data / "snli_ve", "mue_snli_ve")
    task.load_dataset("valid")
    ds = task.dataset("valid")  # 15 examples: batches of 4 leave a partial last batch
    itr = task.get_batch_iterator(ds, max_sentences=4, required_batch_size_multiple=8,
                                  disable_iterator_cache=True).next_epoch_itr(shuffle=False)
    ids, results = [], []
    with caplog.at_level(logging.INFO, logger=vl_task.logger.name):
        for sample in itr:
            ids += sample["id"].tolist()
            results.append(task.count_evaluated(sample))
    assert sorted(ids) == list(range(len(ds)))
    assert results == [None, None, None, True]
    assert "all 15 examples evaluated" in caplog.text
    # a batch that lost rows on the way is reported at the end of the split
    task.get_batch_iterator(ds, max_sentences=8, disable_iterator_cache=True)
    assert task.count_evaluated({"split": "valid", "nsentences": 8}) is None
    with caplog.at_level(logging.ERROR, logger=vl_task.logger.name):
        assert task.count_evaluated({"split": "valid", "nsentences": 5}) is False
    assert "13 of 15 examples evaluated" in caplog.text


# ---- candidate scoring with a model whose logits we control -----------------------------------


class FakeEncoder(nn.Module):
    """Encodes each row as its 'hint' (the source token after bos)."""

    def forward(self, src_tokens, src_lengths=None, patch_images=None, patch_masks=None):
        return {"hint": [src_tokens[:, 1]]}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {"hint": [encoder_out["hint"][0].index_select(0, new_order)]}


class FakeDecoder(nn.Module):
    """logits[row, t] = table[hint of row, previous token at t]."""

    def __init__(self, table, dictionary):
        super().__init__()
        self.table, self.dictionary, self.calls = table, dictionary, []

    def forward(self, prev_output_tokens, encoder_out=None):
        self.calls.append(prev_output_tokens.clone())
        hint = encoder_out["hint"][0]
        return self.table[hint[:, None], prev_output_tokens], {}


class FakeModel(nn.Module):
    def __init__(self, table, dictionary):
        super().__init__()
        self.encoder, self.decoder = FakeEncoder(), FakeDecoder(table, dictionary)


def fake_setup(vocab=10, hints=3, seed=0):
    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(hints, vocab, vocab, generator=g)
    return d, table


def test_score_candidates_equals_hand_computed_log_probs():
    d, table = fake_setup()
    model = FakeModel(table, d)
    eos = d.eos()
    candidates = [torch.tensor([4, eos]), torch.tensor([5, 6, eos]), torch.tensor([7, eos])]
    hints = torch.tensor([2, 0])
    sample = {"net_input": {"src_tokens": torch.stack([torch.tensor([d.bos(), h, eos]) for h in hints]),
                            "src_lengths": torch.tensor([3, 3]), "patch_images": torch.zeros(2, 3, 4, 4),
                            "patch_masks": torch.tensor([True, True]),
                            "prev_output_tokens": torch.zeros(2, 1, dtype=torch.long)}}
    scores, token_scores = score_candidates(model, sample, candidates, return_token_scores=True)
    assert scores.shape == (2, 3) and token_scores.shape == (2, 3, 3)
    for b, h in enumerate(hints.tolist()):
        for j, c in enumerate(candidates):
            prev = [d.bos()] + c[:-1].tolist()
            expected = sum(torch.log_softmax(table[h, p], -1)[t].item() for p, t in zip(prev, c.tolist()))
            assert scores[b, j].item() == pytest.approx(expected, abs=1e-5)
    # one decoder call over the B*K (row, candidate) pairs, row-major, padded with pad
    (prev,) = model.decoder.calls
    assert prev.shape == (6, 3)
    assert prev[1].tolist() == [d.bos(), 5, 6] and prev[3].tolist() == [d.bos(), 4, d.pad()]
    assert token_scores[0, 0, 2].item() == 0.0  # padding contributes nothing


def test_score_candidates_argmax_picks_the_planted_answer():
    d, table = fake_setup(seed=1)
    eos = d.eos()
    candidates = [torch.tensor([4, eos]), torch.tensor([5, eos]), torch.tensor([6, eos])]
    table[:, d.bos(), 4:7] = 0.0
    for h in range(3):
        table[h, d.bos(), 4 + h] = 8.0  # hint h makes answer h far more likely after bos
    labels = torch.tensor([2, 0, 1, 1, 2])
    src = torch.stack([torch.tensor([d.bos(), h, eos]) for h in labels])
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((5,), 3),
                            "patch_images": torch.zeros(5, 3, 4, 4), "patch_masks": torch.ones(5, dtype=torch.bool),
                            "prev_output_tokens": torch.zeros(5, 1, dtype=torch.long)}}
    pred = score_candidates(FakeModel(table, d), sample, candidates).argmax(-1)
    assert pred.tolist() == labels.tolist()


# ---- the generator hook -----------------------------------------------------------------------


def test_make_generator_without_exit_aware_generator(data, monkeypatch):
    from fairseq.sequence_generator import SequenceGenerator

    real_find_spec = vl_task.importlib.util.find_spec
    monkeypatch.setattr(vl_task.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mue.generation" else real_find_spec(name, *a))
    gen_args = make_cfg(["x", "--beam", "1"], options.get_generation_parser()).generation
    task, cfg = make_task(data / "caption", "mue_caption")
    model = task.build_model(cfg.model)
    gen = task.build_generator([model], gen_args)
    assert type(gen) is SequenceGenerator
    exiting, _ = make_task(data / "caption", "mue_caption", "--dec-thres", "0.9")
    with pytest.raises(ValueError, match="mue.generation"):
        exiting.build_generator([model], gen_args)


def test_caption_validation_generates_with_the_model_it_is_given(data):
    """fairseq may validate another model than the one the task built (a wrapped copy, EMA weights): the
    --eval-cider generator must be the given model's, not a generator built once for the first model."""
    task, cfg = make_task(data / "caption", "mue_caption", "--eval-cider")
    first, second = task.build_model(cfg.model), task.build_model(cfg.model)
    assert task.validation_generator(first).model.models[0] is first
    assert task.validation_generator(second).model.models[0] is second
    assert task.validation_generator(second) is task.validation_generator(second)  # built once per model


# ---- end to end: fairseq-train (few updates + validation) and fairseq-generate in-process --------


def valid_stats(caplog):
    stats = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "valid" and r.getMessage().startswith("{")]
    assert stats, "no validation stats were logged"
    return stats[-1]



def train_and_generate(data_dir, task, save_dir, caplog, extra_train=(), extra_gen=()):
    from fairseq_cli import generate, train

    common = ["--task", task, *SMALL, "--cpu", "--num-workers", "0", "--batch-size", "2",
              "--required-batch-size-multiple", "4"]  # > 1: fairseq would drop partial evaluation batches
    cfg = make_cfg([str(data_dir), "--arch", "mue_ofa_micro", *common, "--criterion", "cross_entropy",
                    "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--save-dir", str(save_dir),
                    "--no-epoch-checkpoints", "--log-format", "json", "--seed", "3", *extra_train])
    with caplog.at_level(logging.INFO):
        train.main(cfg)
        stats = valid_stats(caplog)
        results = save_dir / "results.json"
        gcfg = make_cfg([str(data_dir), *common, "--path", str(save_dir / "checkpoint_last.pt"), "--gen-subset",
                         "test", "--beam", "2", "--max-len-b", "5", "--eval-results", str(results), *extra_gen],
                        options.get_generation_parser())
        generate.main(gcfg)
    return stats, json.loads(results.read_text())


def test_end_to_end_snli_ve(data, tmp_path, caplog, one_thread):
    # validation scores the answers with the configured exits (thresholds 0 stop every stream early)
    stats, results = train_and_generate(data / "snli_ve", "mue_snli_ve", tmp_path, caplog,
                                        extra_train=["--img-thres", "0", "--txt-thres", "0", "--dec-thres", "0"])
    assert int(stats["valid_eval_examples"]) == 15  # every validation example, with 15 % 2 != 0
    assert float(stats["valid_mue_time_reduction"]) > 0.4 and float(stats["valid_mue_flops_reduction"]) > 0
    assert 0.0 <= float(stats["valid_snli_score"]) <= 100.0
    assert results["n_examples"] == results["split_size"] == 15
    assert len({r["uniq_id"] for r in results["predictions"]}) == 15
    correct = sum(r["prediction"] == r["answer"] for r in results["predictions"])
    assert results["metrics"]["accuracy"] == pytest.approx(correct / 15)
    assert results["task"] == "snli_ve" and results["run"] == "mue" and results["split"] == "test"
    # the exit summary: every layer ran (default thresholds 1.0), 15 samples, 3 answers x 2 tokens scored
    assert results["exit"]["n_samples"] == 15 and results["exit"]["expected_time_reduction"] == 0.0
    # evaluation takes the 3 pairs of an image in a row: batches of 2 share images, each encoded once
    assert results["exit"]["image_rows"] == 15 and results["exit"]["images_encoded"] < 15
    assert results["exit"]["mean_decoder_layers"] == results["exit"]["n_dec_layers"]
    assert "exit summary on test" in caplog.text
    assert "split 'test': all 15 examples evaluated" in caplog.text


def test_end_to_end_caption(data, tmp_path, caplog, one_thread):
    stats, results = train_and_generate(
        data / "caption", "mue_caption", tmp_path, caplog,
        extra_train=["--eval-cider", "--eval-args", '{"beam": 2, "max_len_b": 5}'],
        extra_gen=["--dec-schedule", "decay", "--dec-decay-len", "7"])
    assert int(stats["valid_eval_examples"]) == 5
    assert float(stats["valid_mue_time_reduction"]) == 0.0  # the exit summary beside the scores; no exits
    # the record holds every exit knob, the schedule's N included
    assert results["thresholds"]["dec_schedule"] == "decay" and results["thresholds"]["dec_decay_len"] == 7
    assert 0.0 <= float(stats["valid_cider"]) and 0.0 <= float(stats["valid_bleu4"]) <= 100.0
    assert len(results["predictions"]) == 5 and all(len(r["refs"]) == 5 for r in results["predictions"])
    assert results["n_examples"] == results["split_size"] == 5 and results["task"] == "caption"
    assert results["exit"]["n_samples"] == 5 and results["exit"]["flops_spent"] == results["exit"]["flops_full"]
    scores = results["metrics"]
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(scores) and scores["num_images"] == 5
    assert all(math.isfinite(v) for v in scores.values())
    assert "caption metrics on test (5 images)" in caplog.text
