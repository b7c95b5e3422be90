"""python -m mue caption|entail: caption your own images, or ask whether they support a statement.

    python -m mue caption photo.jpg photos/ 'more/*.png' --checkpoint CKPT [--dict DICT] [--img-thres 0.99]
    python -m mue entail photo.jpg "two dogs play in the snow" "a cat sleeps" --checkpoint CKPT

Images: files, folders (their image files) and globs. Prints one readable line per answer (``--json``:
a JSON document, on stdout or into a file), a progress bar and the exit summary on stderr; ``--html
OUT.html`` draws where each token exited (mue.visualize). The exit knobs are fairseq-generate's
(mue.exiting.config.ExitConfig, their one owner). The answers come from mue.api, so they are
fairseq-generate's on the same inputs. Output files are written once every answer is in, through a
temporary file, so a failure leaves nothing half-written; errors a user can fix are one line.
"""
import argparse
import json
import logging
import os
import sys
import tempfile

from mue.errors import OptionError
from mue.exiting.stats import reduction_text

GENERATION = (("--beam", int, "beam size (default 5)"),
              ("--max-len-b", int, "at most this many tokens (default 16, OFA's caption evaluation)"),
              ("--no-repeat-ngram-size", int, "no repeated n-grams of this size (default 3; 0: allow)"),
              ("--min-len", int, "at least this many tokens (default 1)"),
              ("--lenpen", float, "length penalty (default 1)"))


def build_parser() -> argparse.ArgumentParser:
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    from mue.exiting.config import ExitConfig

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("model")
    group.add_argument("--checkpoint", required=True, metavar="CKPT", help="a mue fairseq-train checkpoint, or official OFA weights "
                       "converted with python -m mue.checkpoints.convert_ofa")
    group.add_argument("--dict", dest="dict_file", metavar="DICT", help="the dict.txt the checkpoint was trained with (found by "
                       "itself next to a fine-tuned checkpoint's data; needed for converted OFA weights)")
    group.add_argument("--image-size", type=int, help="resize images to this side (default: the checkpoint's)")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    group.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="compute in this precision")
    group.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    gen_parser_from_dataclass(common.add_argument_group("exits (as fairseq-generate's)"), ExitConfig())
    out = common.add_argument_group("output")
    out.add_argument("--json", nargs="?", const="-", metavar="FILE",
                     help="print a JSON document instead of lines (or write it to FILE)")
    out.add_argument("--html", metavar="FILE", help="write a page showing each image, its answer with every token "
                     "coloured by the decoder layer it exited at, and the saving against the full model")
    out.add_argument("--quiet", action="store_true", help="no progress bar, no exit summary on stderr")

    parser = argparse.ArgumentParser(prog="python -m mue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", parents=[common], help="caption images")
    caption.add_argument("images", nargs="+", help="image files, folders or globs")
    for flag, kind, text in GENERATION:
        caption.add_argument(flag, type=kind, help=text)
    entail = commands.add_parser("entail", parents=[common], help="does the image support each hypothesis? "
                                 "(yes / no / maybe)")
    entail.add_argument("image", help="an image file, a folder or a glob: every image is asked every hypothesis")
    entail.add_argument("hypotheses", nargs="+", help="statements about the image")
    entail.add_argument("--premise", help="a text premise (checkpoints trained with --add-premise)")
    return parser


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_output(path) -> None:
    if path and path != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise OptionError(f"{path}: its folder does not exist")


def _line(result) -> str:
    e = result.exits
    image = f"image {e.image_layers}/{e.encoder_layers}, " if e.image_layers is not None else ""
    where = (f"[layers: {image}text {e.text_layers}/{e.encoder_layers}, decoder {e.mean_decoder_layers:.1f}/"
             f"{e.decoder_layers}; time reduction {reduction_text(e.expected_time_reduction)} (Eq. 14), FLOPs "
             f"reduction {reduction_text(e.flops_reduction)}]")
    if hasattr(result, "hypothesis"):
        return f'{result.source}: "{result.hypothesis}" -> {result.answer} ({result.label})  {where}'
    return f"{result.source}: {result.text}  {where}"


def run(args) -> int:
    from tqdm import tqdm

    import mue.api
    from mue.api.inputs import expand_paths
    from mue.exiting.config import as_record, describe, exit_config

    thresholds = exit_config(args)  # bad knobs fail before anything is loaded
    for path in (args.json, args.html):
        _check_output(path)
    files = expand_paths(args.images if args.command == "caption" else [args.image])
    model = mue.api.load(args.checkpoint, args.dict_file, device=args.device, dtype=args.dtype, thresholds=thresholds,
                         image_size=args.image_size)
    if args.command == "caption":
        names = [flag[2:].replace("-", "_") for flag, _, _ in GENERATION]
        generation = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        total, ask = len(files), lambda progress: model.caption(files, batch_size=args.batch_size, progress=progress,
                                                                **generation)
    else:
        generation = {}
        images = [f for f in files for _ in args.hypotheses]
        total, ask = len(images), lambda progress: model.entail(images, args.hypotheses * len(files), args.premise,
                                                                batch_size=args.batch_size, progress=progress)
    with tqdm(total=total, unit="image" if args.command == "caption" else "question", file=sys.stderr,
              disable=True if args.quiet else None) as bar:
        results = ask(bar.update)
    summary = model.last_stats.summary()
    meta = f"{args.checkpoint} ({model.arch}) · exits: {describe(thresholds)}"
    texts = {}
    if args.html:
        from mue.visualize import render_html

        texts[args.html] = render_html(results, meta=meta, summary=summary)
    if args.json:
        document = {"command": args.command, "checkpoint": args.checkpoint, "arch": model.arch,
                    "thresholds": as_record(thresholds), "generation": generation, "summary": summary,
                    "results": [r.as_dict() for r in results]}
        texts[args.json] = json.dumps(document, indent=1) + "\n"
    for path, text in texts.items():
        if path != "-":
            write_atomic(path, text)
    if args.json == "-":
        sys.stdout.write(texts["-"])
    elif not args.json:
        for result in results:
            print(_line(result))
    if not args.quiet:
        print(model.last_stats.format_table(), file=sys.stderr)
        for path in texts:
            if path != "-":
                print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    loggers = [logging.getLogger(name) for name in ("fairseq", "mue")]  # loading logs its steps at INFO
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        return run(args)
    finally:  # called in-process (tests, scripts): leave the caller's logging as it was
        for log, level in zip(loggers, levels):
            log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
