"""Result files for COCO / OFA tools (mue.evaluation.result_files): fairseq-generate's --coco-results scored
by pycocotools + pycocoevalcap as README shows equals the scores fairseq-generate printed and recorded;
numeric image ids load against integer-id COCO annotations; caption_metrics reads COCO annotation files;
SNLI-VE's --snli-results holds OFA's predictions and their accuracy."""
import json
import logging
import os
import re
import shlex

import pytest
import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import mue.tasks  # noqa: F401  (registers the tasks)
from mue.evaluation import caption_metrics as cm
from mue.evaluation import result_files as rf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num-codes", "0", "--num-bins", "0", "--patch-image-size", "32"]
COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


def make_cfg(argv, parser):
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), num_train=2, num_valid=1, num_test=4, image_size=32)
    return root


def train_and_generate(data_dir, task, work, caplog, *generate_args):
    """One update of mue_ofa_micro, then fairseq-generate on test with ``generate_args`` (in-process)."""
    from fairseq_cli import generate, train

    common = ["--task", task, *SMALL, "--cpu", "--num-workers", "0", "--batch-size", "2"]
    torch.set_num_threads(1)
    train.main(make_cfg([str(data_dir), "--arch", "mue_ofa_micro", *common, "--criterion", "cross_entropy",
                         "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--disable-validation",
                         "--save-dir", str(work), "--no-epoch-checkpoints", "--seed", "3"],
                        options.get_training_parser()))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        generate.main(make_cfg([str(data_dir), *common, "--path", str(work / "checkpoint_last.pt"), "--gen-subset",
                                "test", "--eval-results", str(work / "record.json"), *generate_args],
                               options.get_generation_parser()))
    return json.loads((work / "record.json").read_text())


def readme_blocks(language: str) -> list:
    """The ``language`` code blocks of README's "Result files for COCO and OFA tools" section."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("### Result files for COCO and OFA tools", 1)[1].split("\n### ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def run_readme_snippet(refs_file, results_file) -> dict:
    blocks = readme_blocks("python")
    assert len(blocks) == 1, "README's result-file section should hold one Python block"
    code = blocks[0].replace('"test_refs.json"', repr(str(refs_file)))
    code = code.replace('"coco_test.json"', repr(str(results_file)))
    printed = []
    exec(compile(code, "README", "exec"), {"print": lambda *a, **k: printed.append(a)})
    return printed[-1][0]


def test_coco_results_scored_by_pycocoevalcap_equal_the_printed_and_recorded_metrics(data, tmp_path, caplog):
    # --prefix-size 3 starts every caption with its reference's first tokens, so the scores are far from 0
    coco_file = tmp_path / "coco_test.json"
    record = train_and_generate(data / "caption", "mue_caption", tmp_path, caplog, "--beam", "2", "--max-len-b",
                                "6", "--prefix-size", "3", "--eval-metrics", "bleu,rouge,cider",
                                "--coco-results", str(coco_file))
    results = json.loads(coco_file.read_text())
    assert [r["image_id"] for r in results] == [p["image_id"] for p in record["predictions"]]
    assert [r["caption"] for r in results] == [p["caption"] for p in record["predictions"]]
    assert all(set(r) == {"image_id", "caption"} for r in results)
    recorded = record["metrics"]
    assert recorded["CIDEr"] > 0.1 and recorded["Bleu_1"] > 0.1

    refs = data / "caption" / "test_refs.json"  # the COCO-format references the synthetic generator writes
    theirs = run_readme_snippet(refs, coco_file)
    for key in COCO_METRICS:
        assert theirs[key] == pytest.approx(recorded[key], rel=1e-9, abs=1e-12), key
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("caption metrics on test"))
    printed = dict(re.findall(r"(\w+) (\d+\.\d{4})", line))
    for key in COCO_METRICS:
        assert float(printed[key]) == pytest.approx(theirs[key], abs=5e-5), key

    # mue's command line, as README writes it, reads the same two files
    (command,) = readme_blocks("bash")
    argv = shlex.split(command.strip())
    assert argv[:3] == ["python", "-m", "mue.evaluation.caption_metrics"], argv
    names = {"coco_test.json": str(coco_file), "test_refs.json": str(refs)}
    cli = cm.main([names.get(a, a) for a in argv[3:]])
    for key in COCO_METRICS:
        assert cli[key] == pytest.approx(recorded[key], rel=1e-9, abs=1e-12), key


def test_numeric_image_ids_load_against_integer_coco_annotations(tmp_path):
    from pycocotools.coco import COCO

    annotations = {"images": [{"id": 42}, {"id": 7}],
                   "annotations": [{"image_id": 42, "id": 1, "caption": "a red square"},
                                   {"image_id": 7, "id": 2, "caption": "two blue circles"},
                                   {"image_id": 7, "id": 3, "caption": "blue circles"}]}
    ann_file = tmp_path / "captions.json"
    ann_file.write_text(json.dumps(annotations))
    # the task records image ids as strings (TSV columns, Karpathy's cocoid read as text)
    predictions = [{"uniq_id": "42", "image_id": "42", "caption": "a red square"},
                   {"uniq_id": "7", "image_id": "7", "caption": "blue circles"}]
    coco = COCO(str(ann_file))
    with pytest.raises(AssertionError, match="do not correspond"):  # why the ids are converted
        coco.loadRes([{"image_id": p["image_id"], "caption": p["caption"]} for p in predictions])
    out = tmp_path / "sub" / "coco.json"
    rf.write_coco_results(str(out), predictions)
    assert json.loads(out.read_text()) == [{"image_id": 42, "caption": "a red square"},
                                          {"image_id": 7, "caption": "blue circles"}]
    res = coco.loadRes(str(out))
    assert sorted(res.getImgIds()) == [7, 42]
    assert rf.coco_image_id("test_000001") == "test_000001" and rf.coco_image_id("007") == 7
    with pytest.raises(ValueError, match="image 42 has two captions"):
        rf.coco_results(predictions + [{"image_id": "42", "caption": "x"}])
    # caption_metrics --refs reads the annotation file; ids match the results' integer ids
    hyps, refs = cm.load_hyps_refs(hyps=str(out), refs=str(ann_file))
    assert refs == {"42": ["a red square"], "7": ["two blue circles", "blue circles"]} and set(hyps) == set(refs)


def test_coco_annotation_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad_refs.json"
    bad.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}],
                               "annotations": [{"image_id": 1, "caption": "x"}]}))
    hyps = tmp_path / "h.json"
    hyps.write_text(json.dumps([{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}]))
    with pytest.raises(SystemExit, match=r"bad_refs.json: 1 images have no caption"):
        cm.main(["--hyps", str(hyps), "--refs", str(bad)])
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 3, "caption": "x"}]}))
    with pytest.raises(SystemExit, match=r"bad_refs.json: annotations\[0\] refers to image 3"):
        cm.main(["--hyps", str(hyps), "--refs", str(bad)])
    with pytest.raises(SystemExit):
        cm.main(["--results", str(hyps), "--refs", str(bad)])  # one source of hypotheses, not two
    assert "give --results, or both --hyps and --refs" in capsys.readouterr().err


def test_results_help_names_real_options():
    text = cm.__doc__ + cm.build_parser().format_help()
    assert "--caption-results" not in text
    assert "--eval-results" in text and "--coco-results" in text
    for task, option in (("mue_caption", "--coco-results"), ("mue_snli_ve", "--snli-results")):
        cfg = make_cfg(["data", "--task", task, option, "out.json"], options.get_generation_parser())
        assert cfg.task[option[2:].replace("-", "_")] == "out.json"


def test_snli_ve_predictions_file(data, tmp_path, caplog):
    out = tmp_path / "snli_test.json"
    record = train_and_generate(data / "snli_ve", "mue_snli_ve", tmp_path, caplog, "--snli-results", str(out))
    written = json.loads(out.read_text())
    assert written["split"] == "test" and written["n_examples"] == 12  # 4 images x 3 hypotheses
    assert [p["uniq_id"] for p in written["predictions"]] == [r["uniq_id"] for r in record["predictions"]]
    assert all(p["answer"] in ("yes", "no", "maybe") for p in written["predictions"])
    # the accuracy of the written answers against the data's own labels (column 6 of the TSV)
    gold = {}
    for line in (data / "snli_ve" / "test.tsv").read_text().splitlines():
        cols = line.split("\t")
        gold[cols[0]] = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}[cols[5]]
    correct = sum(p["answer"] == gold[p["uniq_id"]] for p in written["predictions"])
    assert written["accuracy"] == pytest.approx(correct / 12) == pytest.approx(record["metrics"]["accuracy"])
