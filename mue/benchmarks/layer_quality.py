#!/usr/bin/env python
"""How well each decoder layer answers: per-layer validation accuracy and loss of trained checkpoints.

    python scripts/layer_quality.py DATA_DIR --task mue_caption CKPT [CKPT ...] [--split valid]

Every layer's hidden state goes through the shared final LayerNorm and tied output projection (as the
layer-wise loss does in training) and is scored teacher-forced on the split. A model trained with the
layer-wise loss (`--criterion mue`) should answer from shallow layers almost as well as from the last;
one trained with last-layer-only cross-entropy should not. Prints one markdown table.
"""
import argparse
import os
import sys

import torch

PLUGIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this mue package: fairseq's --user-dir


def layer_quality(data, task_name, checkpoint, split="valid", batch_size=50, extra=()):
    """{"accuracy": [per layer, %], "nll": [per layer, nats per token], "tokens": n} on `split`."""
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from mue.criterions.mue import MueCriterion

    argv = [data, "--user-dir", PLUGIN, "--task", task_name, "--path", checkpoint, "--cpu",
            "--batch-size", str(batch_size), "--num-workers", "0", "--required-batch-size-multiple", "1", *extra]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_validation_parser(), argv))
    # the task as it was trained (dictionary size, image size), with this script's data dir
    models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides={"data": data, **({"patch_image_size": cfg.task.patch_image_size} if extra else {})})
    model = models[0].eval()
    criterion = MueCriterion(task, last_layer_only=False)  # every layer, whatever the model was trained with
    task.load_dataset(split)
    itr = task.get_batch_iterator(dataset=task.dataset(split), max_sentences=batch_size,
                                  max_positions=None, required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    n_layers = len(model.decoder.layers)
    correct, nll, total = torch.zeros(n_layers), torch.zeros(n_layers), 0
    with torch.no_grad():
        for sample in itr:
            _, _, log = criterion(model, sample)
            total += log["total"]
            for i in range(n_layers):
                correct[i] += log[f"n_correct_l{i + 1}"]
                nll[i] += log[f"nll_loss_l{i + 1}"]
    return {"accuracy": (100.0 * correct / total).tolist(), "nll": (nll / total).tolist(), "tokens": int(total)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--task", required=True, choices=("mue_caption", "mue_snli_ve"))
    parser.add_argument("--split", default="valid")
    parser.add_argument("--patch-image-size", type=int, default=None)
    args = parser.parse_args(argv)
    extra = ["--patch-image-size", str(args.patch_image_size)] if args.patch_image_size else []
    rows = [(ckpt, layer_quality(args.data, args.task, ckpt, args.split, extra=extra)) for ckpt in args.checkpoints]
    n_layers = len(rows[0][1]["accuracy"])
    print(f"Per-layer teacher-forced token accuracy (%) / nll on {args.split} ({rows[0][1]['tokens']} tokens)\n")
    print("| checkpoint | " + " | ".join(f"layer {i + 1}" for i in range(n_layers)) + " |")
    print("|---|" + "---|" * n_layers)
    for ckpt, q in rows:
        cells = [f"{a:.1f} / {n:.3f}" for a, n in zip(q["accuracy"], q["nll"])]
        print(f"| {os.path.relpath(ckpt)} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
