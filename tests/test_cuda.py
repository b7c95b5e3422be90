"""GPU checks: MuE's exits, the layer-wise loss and the fairseq CLIs on CUDA agree with the CPU.

Skipped where no GPU is visible (CI has none). MUE_TEST_DEVICE=cpu runs them against the CPU instead,
to dry-run the test code itself on a machine without a GPU.
"""
import copy
import json
import logging
import os

import pytest
import torch
from fairseq import options, tasks
from fairseq.utils import move_to_cuda

from mue.generation import MueSequenceGenerator
from test_generator import make_sample, model_and_dict  # noqa: F401  (a fixture)
from test_tasks import SMALL, make_cfg, valid_stats

DEVICE = os.environ.get("MUE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
EXITS = dict(img_thres=0.9, txt_thres=0.9, dec_thres=0.9, dec_schedule="decay")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 convolutions (cuDNN's default) would move scores by ~1e-3 and could flip exit decisions."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def to_device(obj):
    return move_to_cuda(obj) if DEVICE == "cuda" else obj


@pytest.fixture(scope="module")
def models(model_and_dict):
    """test_generator's randomised micro model, on the CPU and a copy on the device."""
    cpu, d = model_and_dict
    return d, cpu, copy.deepcopy(cpu).to(DEVICE)


def generate(model, d, sample, exits=EXITS, beam=3):
    gen = MueSequenceGenerator([model], d, exit_config=exits, beam_size=beam, max_len_b=8)
    with torch.no_grad():
        out = gen.generate([model], sample)
    return [h[0]["tokens"].tolist() for h in out], [float(h[0]["score"]) for h in out], gen.stats.summary()


def test_exits_on_gpu_match_the_cpu(models):
    """The same exits in both decoder layouts: rows (the default) and dense, which runs exited rows too (no
    host sync per layer) and so spends more decoder FLOPs for the same layers used."""
    d, cpu, gpu = models
    sample = make_sample(d, 6)
    rows = dict(EXITS, dec_compaction="rows")
    tokens_cpu, scores_cpu, s_cpu = generate(cpu, d, sample, rows)
    tokens_gpu, scores_gpu, s_gpu = generate(gpu, d, to_device(sample), rows)
    assert s_gpu["expected_time_reduction"] > 0  # exits really happened on the device
    assert tokens_gpu == tokens_cpu
    assert scores_gpu == pytest.approx(scores_cpu, abs=1e-3)
    for key in ("mean_image_layers", "mean_text_layers", "mean_decoder_layers", "flops_spent"):
        assert s_gpu[key] == pytest.approx(s_cpu[key], rel=1e-9), key
    tokens_dense, scores_dense, s_dense = generate(gpu, d, to_device(sample), dict(EXITS, dec_compaction="dense"))
    assert tokens_dense == tokens_cpu and scores_dense == pytest.approx(scores_cpu, abs=1e-3)
    assert s_dense["expected_time_reduction"] == pytest.approx(s_cpu["expected_time_reduction"], rel=1e-9)
    assert s_dense["flops_spent"] > s_cpu["flops_spent"]


def test_batched_exits_on_gpu_equal_one_row_at_a_time(models):
    """Per-row exits on a real batch: each row's result and layer count is what it gets alone."""
    d, _, gpu = models
    sample = to_device(make_sample(d, 5, seed=3))
    tokens, _, batched = generate(gpu, d, sample)
    alone, layers = [], []
    for i in range(5):
        net = {k: v[i:i + 1] for k, v in sample["net_input"].items()}
        row = {"id": sample["id"][i:i + 1], "net_input": net}
        if i == 0:  # the padded row: trim its padding as the collater would for a batch of one
            keep = int(net["src_lengths"][0])
            net["src_tokens"] = net["src_tokens"][:, :keep]
        t, _, s = generate(gpu, d, row)
        alone += t
        layers.append((s["mean_image_layers"], s["mean_text_layers"]))
    assert tokens == alone
    assert batched["mean_image_layers"] == pytest.approx(sum(x for x, _ in layers) / 5)
    assert batched["mean_text_layers"] == pytest.approx(sum(y for _, y in layers) / 5)


def test_bf16_generation_when_every_token_exits_at_once(models):
    """bf16 serving with all tokens leaving after the first decoder layer (threshold 0): SDPA in bf16
    returned None for the empty batches the later layers used to get."""
    d, _, gpu = models
    half = copy.deepcopy(gpu).to(torch.bfloat16)
    tokens, _, s = generate(half, d, to_device(make_sample(d, 4)), exits=dict(dec_thres=0.0))
    assert len(tokens) == 4 and all(len(t) > 0 for t in tokens)
    assert s["mean_decoder_layers"] == 1.0


def test_dense_decoder_steps_sync_once_on_the_device():
    """--dec-compaction dense on the device: one host sync per generated token, for any number of layers and
    rows (the grouping check of the beams)."""
    from test_syncs import _model, _syncs_per_step

    for layers, bsz in ((6, 2), (12, 8)):
        assert _syncs_per_step(_model(layers), bsz, 3, "dense", device=DEVICE) == [1] * 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mue.data.synthetic import generate as write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(str(root), num_train=8, num_valid=5, num_test=5, image_size=32)
    return root


def test_layerwise_loss_and_gradients_on_gpu_match_the_cpu(data):
    cfg = make_cfg([str(data / "caption"), "--task", "mue_caption", "--arch", "mue_ofa_micro", *SMALL,
                    "--criterion", "mue", "--label-smoothing", "0.1", "--dropout", "0.0"])
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    dataset = task.dataset("train")
    sample = dataset.collater([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    cpu = task.build_model(cfg.model)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    criterion = task.build_criterion(cfg.criterion)
    cpu.train(), gpu.train()
    loss_cpu, _, log_cpu = criterion(cpu, sample)
    loss_gpu, _, log_gpu = criterion(gpu, to_device(sample))
    loss_cpu.backward(), loss_gpu.backward()
    assert float(loss_gpu.detach()) == pytest.approx(float(loss_cpu.detach()), rel=1e-4)
    for key in [k for k in log_cpu if k.startswith("nll_loss_l")]:
        assert float(log_gpu[key]) == pytest.approx(float(log_cpu[key]), rel=1e-4), key
    # Whole-tensor errors, relative to the tensor's gradient or, for gradients that are zero in exact
    # arithmetic (a key bias shifts every score of a query alike, so softmax ignores it), to a thousandth
    # of the whole model's gradient norm: summation order differs between cuDNN/cuBLAS and the CPU.
    pairs = [(name, p_cpu.grad, p_gpu.grad.cpu()) for (name, p_cpu), p_gpu in zip(cpu.named_parameters(),
                                                                                gpu.parameters())
             if p_cpu.grad is not None]
    total = float(torch.stack([g.norm() for _, g, _ in pairs]).norm())
    for name, want, got in pairs:
        error = float((got - want).norm()) / max(float(want.norm()), 1e-3 * total)
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"
    assert len(pairs) > 50  # the encoder's and decoder's parameters all got gradients


def test_fairseq_train_and_generate_on_gpu_in_fp16(data, tmp_path, caplog):
    """The real CLIs on the device with --fp16, as OFA fine-tunes: training, validation, generation
    with exits (thresholds below 1), and a result record that counts every example."""
    from fairseq_cli import generate as generate_cli, train

    device = [] if DEVICE == "cuda" else ["--cpu"]
    fp16 = ["--fp16"] if DEVICE == "cuda" else []
    common = ["--task", "mue_snli_ve", *SMALL, *device, "--num-workers", "0", "--batch-size", "4",
              "--required-batch-size-multiple", "1"]
    cfg = make_cfg([str(data / "snli_ve"), "--arch", "mue_ofa_micro", *common, *fp16, "--criterion", "mue",
                    "--optimizer", "adam", "--lr", "1e-3", "--max-update", "3", "--save-dir", str(tmp_path),
                    "--no-epoch-checkpoints", "--log-format", "json", "--seed", "3"])
    results = tmp_path / "results.json"
    with caplog.at_level(logging.INFO):
        train.main(cfg)
        stats = valid_stats(caplog)
        gcfg = make_cfg([str(data / "snli_ve"), *common, *fp16, "--path", str(tmp_path / "checkpoint_last.pt"),
                         "--gen-subset", "test", "--img-thres", "0.5", "--txt-thres", "0.5", "--dec-thres", "0.5",
                         "--eval-results", str(results)], options.get_generation_parser())
        generate_cli.main(gcfg)
    assert int(stats["valid_eval_examples"]) == 15 and float(stats["valid_loss"]) == float(stats["valid_loss"])
    record = json.loads(results.read_text())
    assert record["n_examples"] == record["split_size"] == 15
    assert record["exit"]["n_samples"] == 15 and record["exit"]["expected_time_reduction"] > 0
