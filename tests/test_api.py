"""The Python API (mue.api) and `python -m mue`: the same answers as fairseq-generate on the same images
and settings, per-example exit figures that add up and match the model, the README's commands run as
written, and one clear error for each thing a user can get wrong."""
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import mue
from mue.__main__ import main as cli
from mue.api.model import PLACEHOLDER_CAPTION
from mue.data.readers import DataError, OfaCaptionTsv, OfaSnliVeTsv
from mue.errors import OptionError
from mue.exiting.config import exit_config
from mue.exiting.session import exit_session
from mue.models.state_dict import CheckpointMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num-codes", "0", "--num-bins", "0", "--patch-image-size", "32"]
EXITS = {"img_thres": 0.93, "txt_thres": 0.93, "dec_thres": 0.93}  # 1-update models: tokens exit at 3 or 4
EXIT_ARGS = ["--img-thres", "0.93", "--txt-thres", "0.93", "--dec-thres", "0.93"]


def parse(argv, parser):
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Synthetic data, a 1-update checkpoint per task (as the demo's, smaller), the test images as files."""
    from fairseq_cli import train

    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("api")
    data = root / "data"
    generate(str(data), num_train=4, num_valid=2, num_test=4, image_size=32)
    ckpt = {}
    for task, folder in (("mue_caption", "caption"), ("mue_snli_ve", "snli_ve")):
        save = root / f"ckpt_{folder}"
        train.main(parse([str(data / folder), "--task", task, "--arch", "mue_ofa_micro", *SMALL, "--cpu",
                          "--num-workers", "0", "--batch-size", "2", "--criterion", "cross_entropy", "--optimizer",
                          "adam", "--lr", "1e-3", "--max-update", "1", "--save-dir", str(save),
                          "--no-epoch-checkpoints", "--disable-validation", "--seed", "3"],
                         options.get_training_parser()))
        ckpt[folder] = save / "checkpoint_last.pt"
    photos = root / "photos"
    photos.mkdir()
    reader = OfaCaptionTsv(str(data / "caption" / "test.tsv"))
    for i in range(len(reader)):
        reader[i]["image"].save(photos / f"{i}.png")
    images = [str(photos / f"{i}.png") for i in range(len(reader))]
    ckpt["caption_varied"] = randomized_checkpoint(ckpt["caption"], root / "caption_varied.pt", rival_eos=images)
    ckpt["snli_ve_varied"] = randomized_checkpoint(ckpt["snli_ve"], root / "snli_ve_varied.pt")
    return {"root": root, "data": data, "ckpt": ckpt, "photos": photos, "images": images}


# thresholds tried, in order, for one that makes the caption test a test (see `varied_run`), and its decoding
VARYING_THRESHOLDS = (0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95)
VARIED_OPTIONS = dict(beam=2, max_len_b=6, no_repeat_ngram_size=3)


def randomized_checkpoint(trained, path, rival_eos=()):
    """The checkpoint with random O(1) weights (tests/ofa_reference.randomize_), so that examples exit at
    different layers. ``rival_eos`` (image paths): the </s> output row made a close rival of the most generated
    token, so that these images' captions end at different lengths (beam search then drops finished examples
    from the batch while others go on). How close it must be depends on the vocabulary and the random weights:
    the first of a few distances that gives such captions at one of VARYING_THRESHOLDS is kept."""
    from collections import Counter

    from ofa_reference import randomize_

    state = torch.load(trained, weights_only=True)
    model = mue.load(trained)
    with torch.no_grad():
        randomize_(model.model, seed=0)
    if rival_eos:
        tokens = Counter(t for c in model.caption(model_images(), beam=2, max_len_b=6) for t in c.token_ids[:-1])
        weight = model.model.decoder.output_projection.weight
        rival = weight[tokens.most_common(1)[0][0]].clone()
        noise = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0))
        for scale in (0.3, 0.2, 0.1, 0.05):
            with torch.no_grad():
                weight[model.tasks["caption"].dict.eos()] = rival + scale * noise
            if varied_run(model, list(rival_eos)) is not None:
                break
        else:
            raise AssertionError("no </s> rival makes the test model's exits and caption lengths differ")
    state["model"] = model.model.state_dict()
    torch.save(state, path)
    return path


def model_images():
    from PIL import Image

    return [Image.new("RGB", (32, 32), (40 * i, 255 - 60 * i, 90)) for i in range(4)]


def fairseq_generate(work, folder, checkpoint, *extra):
    """fairseq-generate on the test split; {sample id: (score in nats, BPE-id string)} from its H- lines."""
    from fairseq_cli import generate

    out = work["root"] / f"generate_{folder}"
    generate.main(parse([str(work["data"] / folder), "--task", f"mue_{folder}", *SMALL, "--cpu", "--num-workers", "0",
                         "--path", str(checkpoint), "--gen-subset", "test", "--batch-size", "2",
                         "--results-path", str(out), *extra], options.get_generation_parser()))
    lines = (out / "generate-test.txt").read_text().splitlines()
    hypos = {}
    for line in lines:
        if line.startswith("H-"):
            key, score, text = line.split("\t")
            hypos[int(key[2:])] = (float(score) * math.log(2), text)
    return hypos


def teacher_forced_depths(model, task, image, fields, tokens, config):
    """The decoder exit layer of each token of `tokens`, decoding them at once (teacher forcing) for one
    example alone (`fields`: its record's text fields), with exits: an independent route to the layers
    that the search or the batched answer scoring saw (the copy policy gives the same states)."""
    from mue.api.inputs import image_inputs
    from mue.api.model import _Records

    dataset = task.build_dataset("check", _Records(image_inputs([image]), [fields]), False)
    net = dict(dataset.collater([dataset[0]])["net_input"])
    tokens = torch.tensor(tokens)
    net["prev_output_tokens"] = torch.cat([tokens.new_tensor([task.dict.bos()]), tokens[:-1]])[None]
    with torch.no_grad(), exit_session(model, config):
        _, extra = model(**{k: v for k, v in net.items() if k != "image_keys"})
    return extra["exit_depths"][0].tolist()


def assert_same_exits(a, b, cross_kv_at_least=False):
    """Two runs of one example: the same layers, Eq. 14 and FLOPs (by component). ``cross_kv_at_least``: b's
    cross keys/values may be more (beam search computes a layer's for the whole batch)."""
    assert a.token_ids == b.token_ids and a.exits.token_layers == b.exits.token_layers
    for key in ("image_layers", "text_layers", "mean_decoder_layers", "expected_time_reduction", "flops_full"):
        assert getattr(a.exits, key) == pytest.approx(getattr(b.exits, key), rel=1e-9), key
    for part, flops in b.exits.flops_by_component.items():
        assert flops["full"] == pytest.approx(a.exits.flops_by_component[part]["full"], rel=1e-9), part
        if part == "cross_kv" and cross_kv_at_least:
            assert flops["spent"] >= a.exits.flops_by_component[part]["spent"]
        else:
            assert flops["spent"] == pytest.approx(a.exits.flops_by_component[part]["spent"], rel=1e-9), part


# ---- the same answers as fairseq-generate -------------------------------------------------------------


def varied(results) -> bool:
    """Tokens exit at different layers (not all at the last), and in a batch of two one caption ends before
    the other (beam search then drops the finished example from the batch while its batch mate goes on)."""
    layers = {layer for c in results for layer in c.exits.token_layers}
    lengths = [len(c.token_ids) for c in results]
    return len(layers) > 1 and any(a != b for a, b in zip(lengths[::2], lengths[1::2]))


def varied_run(model, images):
    """(thresholds, captions) at the first of VARYING_THRESHOLDS (all three thresholds alike) whose captions
    of ``images`` in batches of two are `varied`; None when none is."""
    for threshold in VARYING_THRESHOLDS:
        exits = {"img_thres": threshold, "txt_thres": threshold, "dec_thres": threshold}
        results = model.caption(images, batch_size=2, thresholds=exits, **VARIED_OPTIONS)
        if varied(results):
            return exits, results
    return None


def test_caption_equals_fairseq_generate_with_exits(work, one_thread):
    options = VARIED_OPTIONS
    model = mue.load(work["ckpt"]["caption_varied"])
    task = model.tasks["caption"]
    found = varied_run(model, work["images"])
    if found is None:
        pytest.fail("no threshold makes the test model's exits and caption lengths differ between examples")
    exits, results = found
    generated = fairseq_generate(work, "caption", work["ckpt"]["caption_varied"], "--beam", "2", "--max-len-b", "6",
                                 "--no-repeat-ngram-size", "3", "--eval-metrics", "bleu",
                                 *(f"--{k.replace('_', '-')}={v}" for k, v in exits.items()))
    assert len(results) == len(generated) == 4
    for i, c in enumerate(results):
        score, bpe = generated[i]
        assert task.dict.string(torch.tensor(c.token_ids)) == bpe  # the same tokens (</s> left out by string)
        assert c.score == pytest.approx(score, abs=1e-5)
        assert c.source == work["images"][i] and c.tokens[-1] == "</s>"
        assert len(c.tokens) == len(c.token_ids) == len(c.token_scores) == len(c.exits.token_layers)
        # the exit layers the search saw are those of decoding the caption at once
        fields = {"captions": [PLACEHOLDER_CAPTION]}
        assert c.exits.token_layers == teacher_forced_depths(model.model, task, c.source, fields, c.token_ids,
                                                             exit_config(exits))
    # the examples' figures add up to what the generator accounted for the run
    summary = model.last_stats.summary()
    assert sum(c.exits.flops for c in results) == pytest.approx(summary["flops_spent"], rel=1e-9)
    assert sum(c.exits.flops_full for c in results) == pytest.approx(summary["flops_full"], rel=1e-9)
    assert sum(c.exits.image_layers for c in results) / 4 == pytest.approx(summary["mean_image_layers"])
    for c in results:
        e = c.exits
        assert 0 < e.expected_time_reduction < 1 and e.flops < e.flops_full and e.seconds > 0
        assert e.expected_time_reduction == pytest.approx(
            1 - ((e.image_layers + e.text_layers) / 2 / 6 + e.mean_decoder_layers / 6) / 2)
    # an example's share of a batch is what it costs alone (beam rows exit on their own; the images differ),
    # whoever its batch mates are; but for the cross keys/values its batch mates' rows made it compute
    alone = model.caption(work["images"], batch_size=1, thresholds=exits, **options)
    mixed = model.caption([work["images"][i] for i in (1, 2, 3, 0)], batch_size=2, thresholds=exits, **options)
    for a, c in zip(alone * 2, results + [mixed[3], *mixed[:3]]):
        assert_same_exits(a, c, cross_kv_at_least=True)
    # thresholds >= 1: the full model, every token at layer 6, nothing saved
    full = model.caption(work["images"][:2], thresholds={}, **options)
    assert all(c.exits.token_layers == [6] * len(c.token_ids) and c.exits.expected_time_reduction == 0
               and c.exits.flops == c.exits.flops_full for c in full)


def test_entail_equals_fairseq_generate_with_exits(work, tmp_path, one_thread):
    reader = OfaSnliVeTsv(str(work["data"] / "snli_ve" / "test.tsv"))
    first = {}  # fairseq-generate asks the pairs of one image in a row (the default, no --no-group-by-image): so does the test
    order = sorted(range(len(reader)), key=lambda i: (first.setdefault(reader.image_id(i), len(first)), i))
    rows = [reader[i] for i in order]
    images = []
    for r in rows:  # raw PNG bytes: another kind of input
        path = tmp_path / "x.png"
        r["image"].save(path)
        images.append(path.read_bytes())
    hypotheses = [r["hypothesis"] for r in rows]
    model = mue.load(str(work["ckpt"]["snli_ve_varied"]))
    for threshold in (0.7, 0.75, 0.8, 0.85, 0.9, 0.95):  # the first at which examples exit differently
        exits = exit_config(img_thres=threshold, txt_thres=threshold, dec_thres=threshold)
        results = model.entail(images, hypotheses, batch_size=2, thresholds=exits)
        if len({(e.exits.image_layers, e.exits.mean_decoder_layers) for e in results}) > 1 and min(
                min(e.exits.token_layers) for e in results) < 6:
            break
    else:
        pytest.fail("no threshold makes the test model's examples exit differently")
    record = tmp_path / "snli.json"
    generated = fairseq_generate(work, "snli_ve", work["ckpt"]["snli_ve_varied"], "--eval-results", str(record),
                                 *(f"--{k.replace('_', '-')}={getattr(exits, k)}" for k in EXITS))
    task = model.tasks["snli_ve"]
    for i, e, image in zip(order, results, images):
        score, bpe = generated[i]
        assert task.dict.string(torch.tensor(e.token_ids)) == bpe and e.score == pytest.approx(score, abs=1e-5)
        assert e.answer in ("yes", "no", "maybe") and e.hypothesis == reader[i]["hypothesis"]
        assert e.exits.token_layers == teacher_forced_depths(
            model.model, task, image, {"hypothesis": e.hypothesis, "premise": "", "label": "entailment"},
            e.token_ids, exits)
    saved = json.loads(record.read_text())
    assert [p["prediction"] for p in saved["predictions"]] == [e.answer for e in results]
    # per-example figures add up to fairseq-generate's exit summary of the same run
    ran = saved["exit"]
    assert ran["flops_spent"] < ran["flops_full"]
    assert sum(e.exits.flops for e in results) == pytest.approx(ran["flops_spent"], rel=1e-9)
    assert sum(e.exits.flops_full for e in results) == pytest.approx(ran["flops_full"], rel=1e-9)
    # every example scores the same 3 x 2 answer tokens, so the mean of their Eq. 14 is the run's
    assert sum(e.exits.expected_time_reduction for e in results) / len(results) == pytest.approx(
        ran["expected_time_reduction"])
    # one question per image: in a batch, each example costs what it costs alone (scoring has no batch effects)
    one_each = [i for i in range(len(rows)) if i == 0 or images[i] != images[i - 1]]
    batched = model.entail([images[i] for i in one_each], [hypotheses[i] for i in one_each], thresholds=exits)
    alone = model.entail([images[i] for i in one_each], [hypotheses[i] for i in one_each], thresholds=exits,
                         batch_size=1)
    assert len(batched) > 2
    for a, b in zip(alone, batched):
        assert_same_exits(a, b)
    with pytest.raises(CheckpointMismatchError, match=r"fine-tuned for mue_snli_ve; caption\(\) needs"):
        model.caption(work["images"][0])


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_json_and_html(work, tmp_path, capsys, one_thread):
    out_json, out_html = tmp_path / "captions.json", tmp_path / "exits.html"
    args = ["caption", str(work["photos"]), "--checkpoint", str(work["ckpt"]["caption"]), "--beam", "2",
            "--max-len-b", "5", "--batch-size", "2", *EXIT_ARGS, "--json", str(out_json), "--html", str(out_html)]
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "MuE exit statistics" in err and f"wrote {out_html}" in err
    document = json.loads(out_json.read_text())
    api = mue.load(work["ckpt"]["caption"], **EXITS).caption(work["images"], beam=2, max_len_b=5, batch_size=2)
    assert [r["source"] for r in document["results"]] == work["images"]  # the folder, sorted
    assert [r["token_ids"] for r in document["results"]] == [c.token_ids for c in api]
    assert [r["exits"]["token_layers"] for r in document["results"]] == [c.exits.token_layers for c in api]
    assert document["thresholds"]["dec_thres"] == 0.93 and document["generation"]["beam"] == 2
    assert document["summary"]["flops_spent"] == pytest.approx(sum(r["exits"]["flops"] for r in document["results"]))
    page = out_html.read_text()
    assert page.count('<img src="data:image/png;base64,') == 4
    chips = re.findall(r'title="([^"]*): exited at layer (\d) of 6', page)
    assert [int(layer) for _, layer in chips] == [layer for c in api for layer in c.exits.token_layers]
    assert all(f">{k}</span>" in page for k in range(1, 7))  # the legend
    assert "image stream" in page and "Eq. 14" in page and "Words by mean exit layer" in page
    assert sorted(os.listdir(tmp_path)) == ["captions.json", "exits.html"]  # no temporary files left

    # readable lines, and entailment over a glob, in JSON on stdout
    assert cli(["caption", work["images"][0], "--checkpoint", str(work["ckpt"]["caption"]), "--quiet",
                "--beam", "2", "--max-len-b", "5"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(work["images"][0] + ": ") and "(Eq. 14)" in line
    page = tmp_path / "entail.html"
    assert cli(["entail", str(work["photos"] / "[01].png"), "there is a red circle", "there are two squares",
                "--checkpoint", str(work["ckpt"]["snli_ve"]), "--json", "--quiet", "--html", str(page)]) == 0
    answers = json.loads(capsys.readouterr().out)["results"]
    assert [(a["source"], a["hypothesis"]) for a in answers] == [
        (work["images"][i], h) for i in (0, 1) for h in ("there is a red circle", "there are two squares")]
    page = page.read_text()
    assert page.count("data:image/png;base64,") == 2 and page.count('"there are two squares"') == 2  # a card per image
    assert all(f"<b>{a['answer']}</b> ({a['label']})" in page for a in answers)


def readme_commands():
    """The shell commands and the Python snippet of the README's "Caption your own images" section."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("### Caption your own images", 1)[1].split("\n### ", 1)[0]
    shell = [block for block in re.findall(r"```bash\n(.*?)```", section, re.S)]
    commands = [shlex.split(c) for block in shell for c in block.replace("\\\n", " ").strip().splitlines()]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    return commands, python


def test_readme_commands_run_as_written(work, tmp_path, capsys, monkeypatch, one_thread):
    """Each README command runs with only its file names replaced: the demo's checkpoints by this test's
    (the same kind: fairseq-train, mue_ofa_micro, synthetic data), OFA's files by an OFA-layout checkpoint
    (mue_ofa_tiny, written as OFA writes them, converted by the command) and its dictionary."""
    from mue.checkpoints.convert_ofa import main as convert
    from mue.data.dictionary import build_ofa_dictionary
    from mue.models import build_arch
    from test_checkpoints import write_ofa_checkpoint

    torch.manual_seed(0)
    ofa = tmp_path / "caption_base_best.pt"
    write_ofa_checkpoint(ofa, build_arch("mue_ofa_tiny", build_ofa_dictionary(str(work["data"] / "dict.txt"))))
    names = {"photo.jpg": work["images"][0], "photos/": str(work["photos"]),
             "results/demo/checkpoints/mue_caption_mue/checkpoint_last.pt": str(work["ckpt"]["caption"]),
             "results/demo/checkpoints/mue_snli_ve_mue/checkpoint_last.pt": str(work["ckpt"]["snli_ve"]),
             "caption_base_best.pt": str(ofa), "caption_base_mue.pt": str(tmp_path / "caption_base_mue.pt"),
             "dict.txt": str(work["data"] / "dict.txt"), "exits.html": str(tmp_path / "exits.html")}
    commands, python = readme_commands()
    assert len(commands) == 4 and len(python) == 1
    for argv in commands:
        assert argv[:2] == [".venv/bin/python", "-m"], argv
        args = [names.get(a, a) for a in argv[3:]]
        if argv[2] == "mue.checkpoints.convert_ofa":
            assert convert(args) == 0
            continue
        assert argv[2] == "mue"
        html = tmp_path / "exits.html"
        if html.exists():
            html.unlink()
        assert cli(args + ["--quiet"]) == 0, argv
        out = capsys.readouterr().out
        if "--json" in args:
            assert len(json.loads(out)["results"]) == 2
        else:
            assert out.count(".png: ") == (1 if "caption_base_mue.pt" in argv else 5)  # photo.jpg + 4 in photos/
        if "--html" in args:
            assert html.read_text().count("data:image/png;base64,") >= 1
    code = python[0]
    for name, path in names.items():
        code = code.replace(f'"{name}"', repr(path))
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    exec(compile(code, "README", "exec"), {})
    assert len(printed) == 1 and isinstance(printed[0][1], list)


# ---- errors -------------------------------------------------------------------------------------------


def rewrite(src, dst, change):
    state = torch.load(src, weights_only=True)
    change(state)
    torch.save(state, dst)
    return str(dst)


def test_clear_errors(work, tmp_path, one_thread):
    ckpt = str(work["ckpt"]["caption"])
    model = mue.load(ckpt)
    # images
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        model.caption(str(tmp_path / "nope.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"broken\.png: cannot read the image: not an image"):
        cli(["caption", work["images"][0], str(broken), "--checkpoint", ckpt, "--quiet", "--html",
             str(out / "x.html"), "--json", str(out / "x.json")])
    assert os.listdir(out) == []  # nothing half-written
    with pytest.raises(DataError, match=r"<bytes 0>: cannot decode the image"):
        model.caption(b"not an image")
    with pytest.raises(DataError, match=r"\*\.jpg: no file matches"):
        cli(["caption", str(tmp_path / "*.jpg"), "--checkpoint", ckpt])
    # dictionaries
    other = tmp_path / "dict.txt"
    lines = (work["data"] / "dict.txt").read_text().splitlines()
    other.write_text("\n".join(lines + ["99999 1"]) + "\n")
    rows = 4 + len(lines) + 1  # <s> <pad> </s> <unk>, dict.txt, <mask>
    with pytest.raises(CheckpointMismatchError, match=rf"dictionary .*dict\.txt does not belong to it: .* {rows + 1} "
                                                      rf"tokens, the checkpoint has {rows} token embeddings"):
        mue.load(ckpt, dict_file=str(other))
    moved = rewrite(ckpt, tmp_path / "moved.pt", lambda s: s["cfg"]["task"].update(data="/nowhere/caption"))
    with pytest.raises(DataError, match=r"no dictionary found \(tried /nowhere/caption/dict\.txt.*give the dict\.txt"):
        mue.load(moved)
    assert mue.load(moved, dict_file=str(work["data"] / "dict.txt")).caption(work["images"][0], beam=1, max_len_b=2)
    # checkpoints of something else
    arch = rewrite(ckpt, tmp_path / "arch.pt", lambda s: s["cfg"]["model"].update(_name="transformer"))
    with pytest.raises(CheckpointMismatchError, match=r"arch 'transformer'; the API runs mue_ofa models"):
        mue.load(arch)
    task = rewrite(ckpt, tmp_path / "task.pt", lambda s: s["cfg"]["task"].update(_name="translation"))
    with pytest.raises(CheckpointMismatchError, match=r"trained for task 'translation'"):
        mue.load(task)
    from mue.models import build_arch
    from test_checkpoints import write_ofa_checkpoint

    ofa = tmp_path / "ofa.pt"
    write_ofa_checkpoint(ofa, build_arch("mue_ofa_micro", model.tasks["caption"].dict))
    with pytest.raises(CheckpointMismatchError, match=r"arch 'ofa_tiny'.*convert it once: python -m "
                                                      r"mue\.checkpoints\.convert_ofa"):
        mue.load(ofa)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointMismatchError, match=r"cannot be read as a checkpoint the safe way"):
        mue.load(tmp_path / "junk.pt")
    with pytest.raises(OptionError, match=r"checkpoint .*none\.pt: file not found"):
        mue.load(tmp_path / "none.pt")
    # exit knobs
    with pytest.raises(OptionError, match=r"--img-thres must be a number in \[-1, inf\), got 'high'"):
        mue.load(ckpt, img_thres="high")
    with pytest.raises(OptionError, match=r"--dec-schedule must be one of"):
        model.caption(work["images"][0], thresholds={"dec_schedule": "sometimes"})
    with pytest.raises(OptionError, match=r"unknown generation option 'beams'"):
        model.caption(work["images"][0], beams=3)


def test_cli_error_is_one_line(work, tmp_path):
    """Run as a user does: a bad threshold is one line on stderr, exit status 1, before anything loads."""
    proc = subprocess.run([sys.executable, "-m", "mue", "caption", work["images"][0], "--checkpoint",
                           str(work["ckpt"]["caption"]), "--img-thres", "-3"],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: --img-thres must be a number in [-1, inf), got -3.0"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
