"""python -m mue.checkpoints.convert_ofa IN OUT [--arch mue_ofa_base]

Rewrites an official OFA checkpoint as a plugin checkpoint that `fairseq-train --finetune-from-model`
(and `--restore-file` with the reset flags) load the safe (weights-only) way. The parameters are
checked strictly against the arch first, so a checkpoint that does not fit fails here, clearly.
"""
import argparse
import sys

import torch

from mue.checkpoints.ofa import infer_arch, load_ofa_state_dict
from mue.models import build_arch
from mue.models.state_dict import check_and_clean_state_dict


def convert(src: str, dst: str, arch: str = None) -> str:
    state_dict = load_ofa_state_dict(src)
    arch = arch or infer_arch(state_dict)
    vocab = state_dict["encoder.embed_tokens.weight"].shape[0]
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    while len(dictionary) < vocab:
        dictionary.add_symbol(f"<tok_{len(dictionary)}>")
    model = build_arch(arch, dictionary=dictionary)
    state_dict = check_and_clean_state_dict(model, state_dict, strict=True)
    torch.save(
        {
            "model": state_dict,
            "mue_arch": arch,
            "optimizer_history": [
                {"criterion_name": "mue", "optimizer_name": "none", "lr_scheduler_state": {"best": None}, "num_updates": 0}
            ],
            "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
            "last_optimizer_state": None,
            "args": None,
            "cfg": None,
        },
        dst,
    )
    return arch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="official OFA checkpoint (.pt); loaded with pickle: only files you trust")
    parser.add_argument("dst", help="where to write the plugin checkpoint")
    parser.add_argument("--arch", default=None, help="mue_ofa_{tiny,medium,base,large}; inferred when omitted")
    args = parser.parse_args(argv)
    try:
        arch = convert(args.src, args.dst, args.arch)
    except (ValueError, FileNotFoundError) as err:
        print(f"convert_ofa: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({arch}); use it with fairseq-train --finetune-from-model {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
